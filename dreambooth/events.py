"""How a training run talks to whoever watches it: an append-only event log and control requests, both files.

Files make the trainer, the worker, the CLI and the UI independent processes: a page reload or a UI restart just
reads the log again, and a request survives until the trainer has handled it.

<model>/logs/events.jsonl   one JSON object per line: {"time": ..., "kind": ..., ...}
<model>/control/<request>   an empty file per pending request: cancel, pause, save, sample

Event kinds the trainer emits (fields beyond time and kind):
  start       total_steps, epochs, steps_per_epoch, step (where it begins, >0 when resuming)
  class_images  done, total        (while generating class images)
  step        step, epoch, loss, lr, it_per_s, eta_s, memory_mb
  sample      step, paths (list of PNG files)
  checkpoint  step, path
  paused / resumed
  done        step, message
  cancelled   step, message
  error       message, (log_tail added by the worker when the process dies)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

REQUESTS = ("cancel", "pause", "save", "sample")
END_KINDS = ("done", "cancelled", "error")


class EventLog:
    def __init__(self, model_path: Path):
        self.path = Path(model_path) / "logs" / "events.jsonl"

    def emit(self, kind: str, **data) -> dict:
        event = {"time": time.time(), "kind": kind, **data}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(event, default=str) + "\n"
        # One write() of a short line in append mode: readers never see half an event.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return event

    def read(self, offset: int = 0) -> tuple[list[dict], int]:
        """Events from byte `offset` on, and the offset to continue from. A partial last line is left for later."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], 0
        end = data.rfind(b"\n") + 1
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events, offset + end

    def clear(self) -> None:
        """Start a new run's log (the previous one is kept as events.jsonl.1)."""
        if self.path.exists():
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))


class Controls:
    def __init__(self, model_path: Path):
        self.folder = Path(model_path) / "control"

    def request(self, name: str) -> None:
        if name not in REQUESTS:
            raise ValueError(f"unknown control request {name!r}; expected one of {', '.join(REQUESTS)}")
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
