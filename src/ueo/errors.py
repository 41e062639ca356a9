"""Errors a user can fix, kept apart from bugs so the CLI can print them cleanly."""


class UeoError(Exception):
    """A user-facing error: the CLI prints its message and exits with code 2."""
