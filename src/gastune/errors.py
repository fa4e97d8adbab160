"""Errors that carry a message meant for a user (the CLI prints them as one line)."""


class GastuneError(ValueError):
    """A problem with the user's input or environment, explained in its message."""
