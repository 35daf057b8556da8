"""The one error type for bad input: the CLI prints its message as one line and exits non-zero; the UI shows it."""
from __future__ import annotations

import errno
import re

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How safetensors (whose errors are not OSErrors) says that the disk is full
DISK_FULL_TEXT = re.compile(r"os error 28\b|code: 28\b|StorageFull|No space left")


class UserError(Exception):
    """Bad input from the user (a path, a name, a setting, a file). The message names the bad value."""

    def __str__(self) -> str:  # the message alone, whatever else the error carries
        return str(self.args[0]) if self.args else ""


class WriteError(UserError, OSError):
    """A file that could not be written (disk full, no permission, a read-only disk). The message names it and says
    what was kept; it is an OSError too, so code that handles failed writes handles it."""

    disk_full = False

    @classmethod
    def of(cls, path, error: Exception, kept: str = "") -> "WriteError":
        """The one-line error for `error` (an OSError, or a writer's own error type such as safetensors') raised while
        writing `path` ("disk full while writing X; ...")."""
        if isinstance(error, WriteError):
            return error
        full = disk_full(error)
        said = next((e.strerror for e in causes(error) if isinstance(e, OSError) and e.strerror), None)
        reason = said or (str(error).splitlines() or [type(error).__name__])[0][:120]
        what = f"disk full while writing {path}" if full else f"cannot write {path} ({reason})"
        made = cls(f"{what}; {kept}" if kept else what)
        made.disk_full = full
        return made


def causes(error: BaseException):
    """`error`, then what caused it (raised from it, or while handling it), and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> bool:
    """Whether a failed write ran out of space (or quota), anywhere in its chain of causes: an OSError saying so, a
    WriteError that said so, or a writer's own error type (safetensors', torch's) whose text says so."""
    for e in causes(error):
        if getattr(e, "disk_full", False) or (isinstance(e, OSError) and e.errno in DISK_FULL):
            return True
        if not isinstance(e, OSError) and DISK_FULL_TEXT.search(str(e)):
            return True
    return False
