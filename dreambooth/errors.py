"""The one error type for bad input: the CLI prints its message as one line and exits non-zero; the UI shows it."""


class UserError(Exception):
    """Bad input from the user (a path, a name, a setting, a file). The message names the bad value."""
