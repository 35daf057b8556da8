"""The one error type for bad input: the CLI prints its message as one line and exits non-zero; the UI shows it."""
from __future__ import annotations

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input from the user (a path, a name, a setting, a file). The message names the bad value."""

    def __str__(self) -> str:  # the message alone, whatever else the error carries
        return str(self.args[0]) if self.args else ""


class WriteError(UserError, OSError):
    """A file that could not be written (disk full, no permission, a read-only disk). The message names it and says
    what was kept; it is an OSError too, so code that handles failed writes handles it."""

    disk_full = False

    @classmethod
    def of(cls, path, error: OSError, kept: str = "") -> "WriteError":
        """The one-line error for `error` raised while writing `path` ("disk full while writing X; ...")."""
        if isinstance(error, WriteError):
            return error
        full = getattr(error, "errno", None) in DISK_FULL
        what = f"disk full while writing {path}" if full else (
            f"cannot write {path} ({getattr(error, 'strerror', None) or type(error).__name__})")
        made = cls(f"{what}; {kept}" if kept else what)
        made.disk_full = full
        return made
