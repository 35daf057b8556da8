"""The data root, laid out like the webui's models folder, and safe file writing.

<root>/models/dreambooth/NAME/   config.json, working/ (diffusers model), class_images/, samples/, logs/, state/
<root>/models/Stable-diffusion/  exported checkpoints
<root>/models/Lora/
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, WriteError

ROOT_ENV = "DREAMBOOTH_ROOT"
# Names Windows cannot create a file or folder with; refused everywhere so a model folder can be copied anywhere.
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# The one shape of a name the product turns into a file or folder name: a model, a concepts file; an exported
# checkpoint's name may also hold parentheses ("dog (final)").
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}"
NAME_PATTERN = re.compile(rf"^{SAFE_NAME}$")
EXPORT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()\-]{0,119}$")


TEMP_FILE = ".tmp"  # `.NAME.XXXXXXXX.tmp`: a file being written (atomic_path)
TEMP_FOLDER = ".creating"  # `.NAME.XXXXXXXX.creating`: a model being created (temporary_folder)
LEGACY_FOLDER_AGE = 3600.0
# Exactly the names ours take (tempfile's 8 random characters), so another program's hidden files are never touched
OUR_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
OUR_TEMP_FOLDER = re.compile(r"^\..+\.[a-z0-9_]{8}\.creating$")
REPLACED_MODEL = re.compile(rf"^\.{SAFE_NAME}\.old$")  # create --overwrite, mid-swap


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


class ModelBusyError(UserError):
    """The model is being written by another process (a training, a create, an export)."""


@dataclass(frozen=True)
class ModelDir:
    """The folder of one DreamBooth model: the one place that names what lies inside it.

    config.json                   the settings (dreambooth.config)
    working/                      the diffusers model training updates; working/training.json the last save's summary
    state/                        resume state: trained weights, optimizer, scheduler, EMA, step, RNG (train/state.py)
    saves/step-S/                 the last N saves' states (hard links; the newest is state/ itself), to go back to
    class_images/  samples/       generated class images, preview images
    logs/events.jsonl             the run's events (dreambooth.events); logs/train.log the trainer's own output
    logs/tensorboard/             TensorBoard scalars; logs/exports.txt the files `export` wrote
    control/                      control requests, one empty file each (cancel, pause, save, sample)
    .lock                         held (flock) by the process that writes the model
    """

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
    def fidelity_scores(self) -> Path:  # {"best_step", "saves": [{"step", "dino", "clip_i", "clip_t", "copy"}]}
        return self.path / "fidelity.json"

    @property
    def training_summary(self) -> Path:  # {"step", "epoch", "total_steps", ...} of the last save
        return self.working / "training.json"

    @property
    def ema_unet(self) -> Path:
        return self.working / "unet_ema"

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
    def events(self) -> Path:
        return self.logs / "events.jsonl"

    @property
    def train_log(self) -> Path:
        return self.logs / "train.log"

    @property
    def exports(self) -> Path:  # one line per checkpoint file `export` wrote (any name the user gave it)
        return self.logs / "exports.txt"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def state(self) -> Path:  # resume state: optimizer, scheduler, EMA, step, RNG
        return self.path / "state"

    @property
    def saves(self) -> Path:  # earlier resume states kept to go back to, one folder per save: step-<S>
        return self.path / "saves"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def lock(self, purpose: str) -> "ModelLock":
        """Hold the model for writing (`with model.lock("training"): ...`); ModelBusyError while another holds it."""
        return ModelLock(self, purpose)


class ModelLock:
    """An exclusive, advisory lock on a model folder, held by one process while it writes the model.

    The operating system drops it when the holder dies, however it dies, so a lock left by a dead process is simply
    taken over. The file records who holds it ({"pid", "purpose"}) for the message another writer gets.
    """

    def __init__(self, model: ModelDir, purpose: str):
        self.model, self.purpose, self._fd = model, purpose, None

    def holder(self) -> dict | None:
        """Who holds the lock now, or None when it is free (a dead holder's lock is free)."""
        if not self.model.lock_path.exists():
            return None
        try:
            with self:
                return None
        except ModelBusyError as e:
            return e.args[1] if len(e.args) > 1 else {}

    def __enter__(self) -> "ModelLock":
        if not self.model.path.is_dir():
            raise UserError(f"model {self.model.name!r}: not found")
        fd = os.open(self.model.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_file(fd)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            what = holder.get("purpose", "in use") if isinstance(holder, dict) else "in use"
            pid = f" (pid {holder['pid']})" if isinstance(holder, dict) and "pid" in holder else ""
            raise ModelBusyError(f"model {self.model.name!r} is {what}{pid}; wait until it ends or cancel it",
                                 holder if isinstance(holder, dict) else {}) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "purpose": self.purpose}).encode("utf-8"))
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the lock
            self._fd = None


# Windows locks byte ranges against every other handle: a temporary file is locked far past anything written to it.
FAR_BYTE = 1 << 40


def _lock_file(fd: int, far: bool = False) -> None:
    """Lock an open file for this process (OSError if another live process holds it). The operating system drops the
    lock when the holder dies, however it dies."""
    if os.name == "nt":
        import msvcrt

        if far:
            os.lseek(fd, FAR_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        if far:
            os.lseek(fd, 0, os.SEEK_SET)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}") if hasattr(os, "pread") else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
        for folder in (self.root, self.models, self.dreambooth, self.checkpoints, self.lora):
            if folder.exists() and not folder.is_dir():
                raise UserError(f"data folder {folder}: is a file, not a folder")
        with writing_to(self.dreambooth):
            for folder in (self.dreambooth, self.checkpoints, self.lora):
                folder.mkdir(parents=True, exist_ok=True)
        return self


def read_bytes(path: Path, limit: int | None = None, offset: int = 0) -> bytes:
    """The bytes of a regular file from `offset` on (at most `limit`). It never waits on a FIFO or a device and never
    takes a folder: anything but a regular file is a UserError naming it, as is a file that cannot be read.
    FileNotFoundError when there is nothing there."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise UserError(f"{path}: is {kind}; expected a file (move it away)")
        os.lseek(fd, offset, os.SEEK_SET)
        size = max(0, info.st_size - offset) if limit is None else min(limit, max(0, info.st_size - offset))
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    An error or a kill never leaves a partial file under the final name, and the previous file stays intact. A write
    that fails (disk full, read-only, no permission) is a WriteError naming `final` and saying so.
    """
    final = Path(final)
    kept = "the previous file is intact" if final.exists() else "no partial file was left"
    with _as_write_error(final, kept):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_FILE, dir=final.parent)
    tmp_path = Path(tmp)
    try:
        with _as_write_error(final, kept):
            _lock_file(fd, far=True)  # held while it is written: `reclaim` leaves it alone (see there)
            os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes it private; ours are ordinary files
        with _as_write_error(final, kept):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


@contextlib.contextmanager
def temporary_folder(parent: Path, name: str, suffix: str = TEMP_FOLDER) -> Iterator[Path]:
    """A new hidden folder `.NAME.XXXXXXXX<suffix>` in `parent`, whose `.lock` this process holds until the block
    ends; removed then unless the block renamed it into place."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=suffix, dir=parent))
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_file(fd)
        os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp makes it private; it may become an ordinary folder
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


@dataclass(frozen=True)
class Reclaimed:
    """What `reclaim` removed: the paths and their size in bytes."""

    paths: tuple = ()
    size: int = 0

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __add__(self, other: "Reclaimed") -> "Reclaimed":
        return Reclaimed(self.paths + other.paths, self.size + other.size)

    def sentence(self) -> str:
        things = "1 temporary file or folder" if len(self.paths) == 1 else f"{len(self.paths)} temporary files or folders"
        return f"Reclaimed {human_size(self.size)}: {things} left by an interrupted create, export or save."


def reclaimed_in(printed: str) -> str:
    """The `Reclaimed.sentence()` a CLI verb printed (the tab repeats it), or ''."""
    return " ".join(line.strip() for line in printed.splitlines() if line.startswith("Reclaimed "))


def human_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _abandoned(path: Path) -> bool:
    """Whether a temporary file or folder belongs to no live process: nobody holds its lock (the file itself, or a
    folder's .lock, exactly as a model's lock). A folder without a .lock (made by an older version) counts as
    abandoned only once nothing in it has changed for an hour."""
    lock = path / ".lock" if path.is_dir() else path
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return path.is_dir() and time.time() - _newest_change(path) > LEGACY_FOLDER_AGE
    except OSError:
        return False
    try:
        _lock_file(fd, far=not path.is_dir())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _newest_change(folder: Path) -> float:
    times = [folder.lstat().st_mtime]
    for dirpath, _, files in os.walk(folder):
        times += [os.lstat(os.path.join(dirpath, f)).st_mtime for f in files]
    return max(times)


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def reclaim(folders, recursive=(), models: Path | None = None) -> Reclaimed:
    """Remove the temporary files (`.X.XXXXXXXX.tmp`) and folders (`.X.XXXXXXXX.creating`; in the `models` folder also
    `.NAME.old`, a model being replaced) that processes killed while writing them left in `folders` (and anywhere
    under the `recursive` ones). Only what no live process holds goes."""
    candidates = []
    for folder in folders:
        if Path(folder).is_dir():
            candidates += [p for p in Path(folder).iterdir() if p.name.startswith(".")]
    for folder in recursive:
        if Path(folder).is_dir():
            candidates += [p for p in Path(folder).rglob(f".*{TEMP_FILE}") if p.is_file()]
    removed = Reclaimed()
    for path in candidates:
        if path.is_symlink():
            continue
        is_temp = (path.is_file() and OUR_TEMP_FILE.match(path.name)) or (path.is_dir() and (
            OUR_TEMP_FOLDER.match(path.name) or (REPLACED_MODEL.match(path.name) and path.parent == models)))
        if not is_temp or not _abandoned(path):
            continue
        try:
            size = _size(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove: left for the next time
        removed += Reclaimed((path,), size)
    return removed


def reclaim_leftovers(root: "DataRoot", model: ModelDir | None = None) -> Reclaimed:
    """`reclaim` where the product writes: the models folder, the checkpoint and LoRA folders, and a model's folder."""
    return reclaim([root.dreambooth, root.checkpoints, root.lora], [model.path] if model else [], root.dreambooth)


@contextlib.contextmanager
def _as_write_error(path: Path, kept: str = "") -> Iterator[None]:
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # OSError, or a writer's own type for it (safetensors' SafetensorError)
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        raise WriteError.of(path, e, kept) from e


def writing_to(path: Path, kept: str = ""):
    """A block that writes `path` (not through atomic_path): a failed write is a WriteError naming it."""
    return _as_write_error(Path(path), kept)


def atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(final) as tmp:
        write(tmp)
    return Path(final)


def atomic_write_text(final: Path, text: str) -> Path:
    return atomic_write(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
