"""The training loop, checkpoints, metrics and the local launcher.

``python -m farflung.train CONFIG`` is the worker entry point (also under torchrun)."""
