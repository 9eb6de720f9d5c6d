"""farflung: train GPT-style models across far-flung machines joined by slow links."""

__version__ = "0.1.0"
