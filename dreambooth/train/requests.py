"""What the watcher asks of a run, merged in one place: request files in <model>/control/ and the signals.

SIGINT (Ctrl-C) and SIGTERM mean "cancel". Under several processes the main process reads the files and every process
gets the same set (`broadcast`), so all of them take the same decision at the same step.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator


class Requests:
    def __init__(self, controls, main: bool = True, broadcast: Callable[[set], set] = lambda pending: pending):
        self.controls = controls
        self.main = main
        self.broadcast = broadcast
        self.interrupted = False  # a SIGINT or SIGTERM arrived

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator["Requests"]:
        """SIGINT and SIGTERM set `interrupted` instead of killing the process (main thread only: elsewhere Python
        cannot install handlers, and the caller stops the run through the files)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def local(self) -> set[str]:
        """This process's view: the request files (main process only) plus "cancel" after a signal."""
        now = self.controls.pending() if self.main else set()
        if self.interrupted:
            now.add("cancel")
        return now

    def pending(self) -> set[str]:
        """The requests now, the same set in every process (call it in every process at the same point)."""
        return self.broadcast(self.local())

    def wait_while_paused(self, pending: set[str], poll_s: float = 0.2) -> set[str]:
        """While "pause" is requested and "cancel" is not, wait; returns `pending` with what arrived meanwhile."""
        while "pause" in pending and "cancel" not in pending:
            time.sleep(poll_s)
            now = self.pending()
            if "pause" not in now:
                return (pending - {"pause"}) | now
            pending = pending | now
        return pending

    def handled(self, name: str) -> None:
        """A request was carried out: its file goes (requests stay until handled, so none is lost)."""
        if self.main:
            self.controls.withdraw(name)

    def clear(self) -> None:
        """Stale requests of an earlier run are dropped at start."""
        if self.main:
            self.controls.clear_all()
