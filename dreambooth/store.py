"""The data root, laid out like the webui's models folder, and safe file writing.

<root>/models/dreambooth/NAME/   config.json, working/ (diffusers model), class_images/, samples/, logs/, state/
<root>/models/Stable-diffusion/  exported checkpoints
<root>/models/Lora/
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

ROOT_ENV = "DREAMBOOTH_ROOT"
# Names Windows cannot create a file or folder with; refused everywhere so a model folder can be copied anywhere.
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")


class ModelNameError(UserError):
    """A model name that cannot be used as a folder name."""


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ModelNameError("model name: must not be empty")
    if "/" in name or "\\" in name:
        raise ModelNameError(f"model name {name!r}: must not contain path separators")
    if name in (".", "..") or ".." in name:
        raise ModelNameError(f"model name {name!r}: must not contain '..'")
    if name.split(".")[0].strip().lower() in RESERVED_NAMES:
        raise ModelNameError(f"model name {name!r}: is a reserved device name")
    if name != name.strip() or name.endswith("."):
        raise ModelNameError(f"model name {name!r}: must not start or end with spaces or end with a dot")
    if not NAME_PATTERN.match(name):
        raise ModelNameError(f"model name {name!r}: use letters, digits, spaces, '_', '-' and '.' (at most 100)")
    return name


def default_root() -> Path:
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "data"


@dataclass(frozen=True)
class ModelDir:
    """The folder of one DreamBooth model."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def working(self) -> Path:  # the diffusers model that training updates
        return self.path / "working"

    @property
    def class_images(self) -> Path:
        return self.path / "class_images"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def state(self) -> Path:  # resume state: optimizer, scheduler, EMA, step, RNG
        return self.path / "state"

    def exists(self) -> bool:
        return self.config_path.is_file()


@dataclass(frozen=True)
class DataRoot:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def dreambooth(self) -> Path:
        return self.models / "dreambooth"

    @property
    def checkpoints(self) -> Path:
        return self.models / "Stable-diffusion"

    @property
    def lora(self) -> Path:
        return self.models / "Lora"

    def model(self, name: str) -> ModelDir:
        return ModelDir(self.dreambooth / check_model_name(name))

    def model_names(self) -> list[str]:
        if not self.dreambooth.is_dir():
            return []
        return sorted(p.name for p in self.dreambooth.iterdir() if (p / "config.json").is_file())

    def ensure(self) -> "DataRoot":
        for folder in (self.dreambooth, self.checkpoints, self.lora):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    An error or a kill never leaves a partial file under the final name, and the previous file stays intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(final) as tmp:
        write(tmp)
    return Path(final)


def atomic_write_text(final: Path, text: str) -> Path:
    return atomic_write(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))
