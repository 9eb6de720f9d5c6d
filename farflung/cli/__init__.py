"""The ``farflung`` command line."""
