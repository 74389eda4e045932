"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class LmdepotError(Exception):
    """An error caused by the user's input (a file, flag or request), not a bug."""

    exit_code = 2


class FormatError(LmdepotError):
    """A workspace file is missing, corrupt or inconsistent."""


class ConvertError(LmdepotError):
    """The source checkpoint cannot be converted as asked."""
