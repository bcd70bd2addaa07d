"""Errors that are the user's to fix: the CLI prints them as one line."""


class UserError(Exception):
    """A mistake in input or setup, with a message that says what to do."""
