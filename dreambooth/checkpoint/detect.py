"""The family of any source `create` takes, read before it is imported: a single file (its keys and the yaml beside
it) or a diffusers folder (its configs)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..families import Detection, check_family_choice, check_forced, detect_keys, family_from_folder
from .tensorio import open_checkpoint


def detect(source: str | Path, forced: str = "auto") -> Detection:
    """The family of any source `create` takes: a single file (keys + yaml), a diffusers folder (configs); a hub id
    cannot be read before it is loaded (call detect on the loaded folder)."""
    check_family_choice(forced)
    path = Path(source).expanduser()
    if path.is_dir():
        found = family_from_folder(path)
        if forced != "auto":
            check_forced(found, forced, str(source))
            return Detection(forced, "forced by the user")
        return Detection(found, "from the diffusers configs")
    if path.is_file():
        keys = open_checkpoint(path).keys()
        return detect_keys(keys, path.with_suffix(".yaml"), forced, what=str(path))
    raise UserError(f"source {str(source)!r}: no such file or folder")
