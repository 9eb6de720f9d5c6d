"""Elastic membership: the coordinator that admits, watches and re-forms the workers of a
run (``coordinator``), a worker's side of it (``member``) and the authenticated state
transfer that brings a newcomer up to date (``state_transfer``). Above the transport
(``farflung.comm``), below the training loop that uses it (``farflung.train``)."""
