"""The one error type for bad input: the CLI prints its message as one line and exits non-zero; the UI shows it."""


class UserError(Exception):
    """Bad input from the user (a path, a name, a setting, a file). The message names the bad value."""


class WriteError(UserError, OSError):
    """A file that could not be written (disk full, no permission). The message names it and says what was kept;
    it is an OSError too, so code that handles failed writes handles it."""
