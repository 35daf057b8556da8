"""How a training run talks to whoever watches it: typed events in an append-only log, control requests as files,
and the fold that turns the log into the run's status. Writers and readers use these records, never raw keys.

Files make the trainer, the job supervisor, the CLI and the UI independent processes: a page reload or a UI restart just
reads the log again, and a request survives until the trainer has handled it.

<model>/logs/events.jsonl   one JSON object per line: {"time": ..., "kind": ..., <the record's fields>}
<model>/control/<request>   an empty file per pending request: cancel, pause, save, sample

A child process that is not a training (create, export, started by the UI) reports through its exit code and, when
asked, a one-event log of its own (`python -m dreambooth --report FILE VERB`): Done(message) or Error(message).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterable

REQUESTS = ("cancel", "pause", "save", "sample")
MAX_CHART_POINTS = 400


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""
    time: float = field(default=0.0, kw_only=True)  # set by EventLog.emit


@dataclass(frozen=True)
class Start(Event):
    kind: ClassVar[str] = "start"
    total_steps: int
    epochs: int
    steps_per_epoch: int
    step: int  # where this run begins: > 0 when it resumes a saved run


@dataclass(frozen=True)
class ClassImages(Event):
    """Progress of class-image generation, before the first step."""

    kind: ClassVar[str] = "class_images"
    done: int
    total: int
    eta_s: float | None = None


@dataclass(frozen=True)
class Step(Event):
    kind: ClassVar[str] = "step"
    step: int
    epoch: int  # counted from 0
    loss: float
    lr: float
    it_per_s: float
    eta_s: float | None
    memory_mb: float  # peak GPU memory allocated, or the process's peak RSS without a GPU


@dataclass(frozen=True)
class Validation(Event):
    """The loss on the held-out images at fixed timesteps and noise."""

    kind: ClassVar[str] = "validation"
    step: int
    loss: float


@dataclass(frozen=True)
class Fidelity(Event):
    """How well the save of `step` has learnt its subject (train/fidelity.py: the mean over the concepts), and the
    best save so far by the declared rule (None: no save qualifies yet)."""

    kind: ClassVar[str] = "fidelity"
    step: int
    dino: float
    clip_i: float
    clip_t: float
    copy: float
    best_step: int | None = None
    saved: bool = True  # False: scored on Sample now, with no save behind it (never the best save)


@dataclass(frozen=True)
class Sample(Event):
    kind: ClassVar[str] = "sample"
    step: int
    paths: tuple  # PNG files


@dataclass(frozen=True)
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Paused(Event):
    kind: ClassVar[str] = "paused"
    step: int


@dataclass(frozen=True)
class Resumed(Event):
    kind: ClassVar[str] = "resumed"
    step: int


@dataclass(frozen=True)
class Done(Event):
    kind: ClassVar[str] = "done"
    step: int
    message: str


@dataclass(frozen=True)
class Cancelled(Event):
    kind: ClassVar[str] = "cancelled"
    step: int
    message: str


@dataclass(frozen=True)
class Error(Event):
    kind: ClassVar[str] = "error"
    message: str
    step: int | None = None


RECORDS = {cls.kind: cls for cls in (Start, ClassImages, Step, Validation, Fidelity, Sample, Checkpoint, Paused,
                                     Resumed, Done, Cancelled, Error)}
END_KINDS = ("done", "cancelled", "error")


def to_json(event: Event) -> dict:
    return {"time": event.time, "kind": event.kind, **{k: v for k, v in asdict(event).items() if k != "time"}}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each field's declared type accepts from a log line (a hand-edited or foreign log may hold anything).
_ACCEPTS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62,
    "float": _number,
    "str": lambda v: isinstance(v, str),
    "tuple": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
}


def _accepts(declared: str, value) -> bool:
    kinds = [k.strip() for k in declared.split("|")]
    return (value is None and "None" in kinds) or any(_ACCEPTS[k](value) for k in kinds if k in _ACCEPTS)


def from_json(data: object) -> Event | None:
    """The record of one logged object; None for anything that is not one (a foreign or damaged line, a field of
    the wrong type)."""
    if not isinstance(data, dict) or data.get("kind") not in RECORDS:
        return None
    cls = RECORDS[data["kind"]]
    declared = {f.name: f.type for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in declared}
    if not all(_accepts(declared[k], v) for k, v in values.items()):
        return None
    if "paths" in values:
        values["paths"] = tuple(values["paths"])
    if isinstance(values.get("time"), int):
        values["time"] = float(values["time"])
    try:
        return cls(**values)
    except TypeError:  # a required field is missing
        return None


# ---------------------------------------------------------------- the log and the requests


class EventLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def emit(self, event: Event) -> Event:
        stamped = type(event)(**{**{f.name: getattr(event, f.name) for f in fields(event)}, "time": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(to_json(stamped), default=str) + "\n"
        # One write() of a short line in append mode: readers never see half an event.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return stamped

    def read(self, offset: int = 0) -> tuple[list[Event], int]:
        """Events from byte `offset` on, and the offset to continue from. A partial last line is left for later.
        A log that is not a regular file (a folder, a FIFO) is a UserError naming it."""
        from .store import read_bytes

        try:
            data = read_bytes(self.path, offset=offset)
        except FileNotFoundError:
            return [], 0
        end = data.rfind(b"\n") + 1
        events = []
        for line in data[:end].splitlines():
            try:
                event = from_json(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if event is not None:
                events.append(event)
        return events, offset + end

    def clear(self) -> None:
        """Start a new run's log (the previous one is kept as events.jsonl.1)."""
        if self.path.exists():
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))


class Controls:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def request(self, name: str) -> None:
        from .store import writing_to

        if name not in REQUESTS:
            raise ValueError(f"unknown control request {name!r}; expected one of {', '.join(REQUESTS)}")
        with writing_to(self.folder / name):
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / name).touch()

    def withdraw(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def pending(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.iterdir() if p.name in REQUESTS}

    def clear_all(self) -> None:
        for name in REQUESTS:
            self.withdraw(name)


# ---------------------------------------------------------------- the fold


@dataclass
class RunStatus:
    """What a run's events say about it. The job supervisor (dreambooth.jobs) adds what only the process can tell (alive, log tail)."""

    state: str = "idle"  # idle, running, paused, done, cancelled, error
    step: int = 0
    start_step: int = 0  # where this run began (a resumed run trains start_step..total_steps)
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    memory_mb: float | None = None
    class_images: tuple = ()  # (done, total) while generating class images
    losses: list = field(default_factory=list)  # [(step, loss)], thinned for the chart
    validation: list = field(default_factory=list)  # [(step, validation loss)]
    fidelity: list = field(default_factory=list)  # [(step, dino, clip_i, clip_t, copy)] of each scored save
    best_step: int | None = None  # the best scored save (events.Fidelity)
    samples: list = field(default_factory=list)  # newest last
    checkpoints: list = field(default_factory=list)
    message: str = ""

    @property
    def ended(self) -> bool:
        return self.state in END_KINDS


def fold(events: Iterable[Event]) -> RunStatus:
    return Fold().feed(events).status()


class Fold:
    """The fold of a run's events, fed as they arrive (so a long run's status costs what was appended since)."""

    def __init__(self):
        self._st, self._losses, self.count = RunStatus(), [], 0

    def feed(self, events: Iterable[Event]) -> "Fold":
        events = list(events)
        _fold_into(self._st, self._losses, events)
        self.count += len(events)
        return self

    def status(self) -> RunStatus:
        st = RunStatus(**{**vars(self._st), "samples": list(self._st.samples),
                          "checkpoints": list(self._st.checkpoints), "validation": list(self._st.validation),
                          "fidelity": list(self._st.fidelity)})
        stride = max(1, len(self._losses) // MAX_CHART_POINTS)
        st.losses = self._losses[::stride]
        return st


class Follower:
    """Follows event logs: each `status(path)` parses only the lines appended since the last call. A log that was
    replaced (a new run) or shortened is read again from its start."""

    def __init__(self):
        self._logs: dict[str, tuple] = {}  # path -> (file identity, offset, Fold)
        self._lock = threading.Lock()  # the UI polls from several threads

    def status(self, path: Path) -> tuple[RunStatus, bool]:
        """(the fold of the log at `path`, whether it holds any event)."""
        with self._lock:
            return self._status(path)

    def _status(self, path: Path) -> tuple[RunStatus, bool]:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self._logs.pop(str(path), None)
            return RunStatus(), False
        identity = (info.st_dev, info.st_ino)
        known, offset, folded = self._logs.get(str(path), (None, 0, None))
        if known != identity or info.st_size < offset or folded is None:
            offset, folded = 0, Fold()
        events, offset = EventLog(path).read(offset)
        folded.feed(events)
        self._logs[str(path)] = (identity, offset, folded)
        return folded.status(), folded.count > 0


def _fold_into(st: RunStatus, losses: list, events: Iterable[Event]) -> None:
    for e in events:
        if isinstance(e, Start):
            st.total_steps, st.epochs, st.step, st.start_step = e.total_steps, e.epochs, e.step, e.step
            st.state = "running"
        elif isinstance(e, ClassImages):
            st.class_images = (e.done, e.total)
            st.eta_s = e.eta_s
            st.state = "running"
        elif isinstance(e, Step):
            st.step, st.epoch, st.loss, st.lr = e.step, e.epoch, e.loss, e.lr
            st.it_per_s, st.eta_s, st.memory_mb = e.it_per_s, e.eta_s, e.memory_mb
            losses.append((e.step, e.loss))
        elif isinstance(e, Validation):
            st.validation.append((e.step, e.loss))
        elif isinstance(e, Fidelity) and e.saved:
            st.fidelity.append((e.step, e.dino, e.clip_i, e.clip_t, e.copy))
            st.best_step = e.best_step
        elif isinstance(e, Sample):
            st.samples.extend(e.paths)
        elif isinstance(e, Checkpoint):
            st.checkpoints.append(e.path)
        elif isinstance(e, Paused):
            st.state = "paused"
        elif isinstance(e, Resumed):
            st.state = "running"
        elif isinstance(e, (Done, Cancelled, Error)):
            st.state = e.kind
            st.step = e.step if e.step is not None else st.step
            st.message = e.message
