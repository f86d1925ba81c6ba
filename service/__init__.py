"""tally: a customer read-model service."""

__version__ = "0.1.0"
