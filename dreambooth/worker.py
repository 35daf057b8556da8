"""Runs one training at a time per data root, in a child process, and tells the UI how it goes.

The trainer is always `python -m dreambooth --root R train NAME` in its own process (and its own session, so it
survives a restart of the UI or the webui). Everything the UI shows is read back from files on each poll:

<root>/models/dreambooth/.job.json   the running job: {"name", "pid", "started"}; stale when the pid is gone
<model>/logs/events.jsonl            the trainer's events (dreambooth.events)
<model>/logs/train.log               the trainer's stdout and stderr; its tail is shown when the process dies
<model>/control/                     control requests (cancel, pause, save, sample)

So a page reload, a second browser or a restarted UI simply re-attaches. Heavy one-off work the UI triggers (create,
export) also runs as a child process: the host process (the webui) never loads training weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, validate_for_training
from .errors import UserError
from .events import END_KINDS, Controls, EventLog
from .host import Host
from .store import DataRoot, atomic_write_text

JOB_FILE = ".job.json"
LOG_TAIL_LINES = 25
MAX_CHART_POINTS = 400
# The folder that holds the `dreambooth` package: the child must import the same code, wherever it is installed
# (inside the webui it is only on sys.path because scripts/ put it there).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class JobRunningError(UserError):
    """A second training was asked for while one runs."""


# ---------------------------------------------------------------- processes


def _pid_alive(pid: int, ours: bool = True) -> bool:
    """True if `pid` is a live (not zombie) process; with `ours`, one that runs our package (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():  # Linux: a zombie is dead, and a recycled pid that runs something else is not ours
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return not ours or b"dreambooth" in proc.joinpath("cmdline").read_bytes()
        except (OSError, IndexError):
            return False
    return True


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _cli(root: DataRoot, *args: str) -> list[str]:
    return [sys.executable, "-m", "dreambooth", "--root", str(root.root), *args]


def trainer_command(root: DataRoot, name: str) -> list[str]:
    """The training process: always the real CLI (tests of the lock and crash handling swap in a small script)."""
    return _cli(root, "train", name)


def run_cli(root: DataRoot, *args: str, timeout: float | None = None) -> str:
    """Run a short CLI verb (create, export) in a child process; its `error: ...` line becomes a UserError."""
    proc = subprocess.run(_cli(root, *args), env=_child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
        raise UserError(errors[-1] if errors else f"`{' '.join(args[:2])}` failed (exit {proc.returncode}): "
                        + " | ".join(lines[-LOG_TAIL_LINES:]))
    return proc.stdout.strip()


# ---------------------------------------------------------------- the job lock


def _job_path(root: DataRoot) -> Path:
    return root.dreambooth / JOB_FILE


def _read_job(root: DataRoot) -> dict | None:
    try:
        job = json.loads(_job_path(root).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return job if isinstance(job, dict) else None


def _job_alive(job: dict | None) -> bool:
    # While a start is claiming the lock, the pid is the starting process (the webui: not a `dreambooth` command).
    return bool(job) and _pid_alive(job.get("pid"), ours=not job.get("claiming"))


def running_job(root: DataRoot) -> dict | None:
    """The job that runs now ({"name", "pid", "started"}), or None."""
    job = _read_job(root)
    return job if _job_alive(job) else None


def last_job(root: DataRoot) -> dict | None:
    """The running job, or the one that ran last (its file stays until the next start replaces it)."""
    job = _read_job(root)
    return job if job and isinstance(job.get("name"), str) else None


def recently_active(root: DataRoot, name: str, seconds: float = 5.0) -> bool:
    """True if the model's event log or the job file changed in the last `seconds` (a job that has just ended)."""
    changed = [p.stat().st_mtime for p in (EventLog(root.model(name).path).path, _job_path(root)) if p.exists()]
    return bool(changed) and time.time() - max(changed) < seconds


def _claim(root: DataRoot, name: str) -> None:
    """Create the job file exclusively, replacing a stale one; refuse if a live job holds it."""
    root.dreambooth.mkdir(parents=True, exist_ok=True)
    path = _job_path(root)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            job = _read_job(root)
            if _job_alive(job):
                raise JobRunningError(f"a training is already running: {job.get('name')!r} (pid {job.get('pid')}); "
                                      "cancel it or wait until it ends") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        # Until the child exists the claim is held by this (live) process.
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"name": name, "pid": os.getpid(), "started": time.time(), "claiming": True}, f)
        return
    raise JobRunningError("another training is starting at this moment; try again")


# ---------------------------------------------------------------- starting and watching


def start(root: DataRoot, name: str, host: Host | None = None) -> dict:
    """Start training `name` in a child process. Returns the job. Bad config or a running job: UserError."""
    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found in {root.dreambooth}")
    validate_for_training(Config.load(model.config_path))
    _claim(root, name)
    try:
        EventLog(model.path).clear()
        Controls(model.path).clear_all()
        model.logs.mkdir(parents=True, exist_ok=True)
        log_path = model.logs / "train.log"
        if log_path.exists():
            os.replace(log_path, log_path.with_suffix(".log.1"))
        if host is not None:
            host.before_training()
        popen_kw = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(trainer_command(root, name), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=_child_env(), **popen_kw)
        job = {"name": name, "pid": proc.pid, "started": time.time()}
        atomic_write_text(_job_path(root), json.dumps(job))
    except BaseException:
        _job_path(root).unlink(missing_ok=True)
        if host is not None:
            host.after_training()
        raise
    watch(root, job, host, proc)
    return job


def watch(root: DataRoot, job: dict, host: Host | None, proc: subprocess.Popen | None = None) -> threading.Thread:
    """Follow a job from this process: refresh the host's checkpoint list on each checkpoint, reap the child when it
    exits (recording its exit code for the status), then give the host its model back."""

    def follow() -> None:
        model = root.model(job["name"])
        log, offset = EventLog(model.path), 0
        while True:
            ended = proc.poll() is not None if proc is not None else not _pid_alive(job["pid"])
            events, offset = log.read(offset)
            if host is not None and any(e.get("kind") == "checkpoint" for e in events):
                host.checkpoints_changed()
            if ended:
                break
            time.sleep(0.5)
        if proc is not None:
            current = _read_job(root)
            if current and current.get("pid") == job["pid"]:
                atomic_write_text(_job_path(root), json.dumps({**current, "returncode": proc.returncode}))
        if host is not None:
            host.checkpoints_changed()
            host.after_training()

    thread = threading.Thread(target=follow, name=f"dreambooth-watch-{job['name']}", daemon=True)
    thread.start()
    return thread


def attach(root: DataRoot, host: Host | None) -> dict | None:
    """On (re)start of the UI: follow a job that is still running from an earlier UI process."""
    job = running_job(root)
    if job is not None:
        watch(root, job, host)
    return job


# ---------------------------------------------------------------- controls


def _require_running(root: DataRoot, name: str) -> dict:
    job = running_job(root)
    if job is None or job.get("name") != name:
        raise UserError(f"model {name!r}: no training is running" + (f" (running: {job['name']!r})" if job else ""))
    return job


def request(root: DataRoot, name: str, what: str) -> str:
    """cancel, save, sample, or pause (which resumes when already paused). Returns a short message."""
    _require_running(root, name)
    controls = Controls(root.model(name).path)
    if what == "pause":
        if status(root, name).state == "paused" or "pause" in controls.pending():
            controls.withdraw("pause")
            return "resume requested"
        controls.request("pause")
        return "pause requested"
    if what == "cancel":
        controls.withdraw("pause")  # a paused trainer must wake up to see the cancel
    controls.request(what)
    return f"{what} requested"


# ---------------------------------------------------------------- status


@dataclass
class Status:
    name: str
    state: str = "idle"  # idle, starting, running, paused, done, cancelled, error
    step: int = 0
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
    samples: list = field(default_factory=list)  # newest last
    checkpoints: list = field(default_factory=list)
    message: str = ""
    log_tail: str = ""
    running: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def log_tail(root: DataRoot, name: str, lines: int = LOG_TAIL_LINES) -> str:
    path = root.model(name).logs / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    # tqdm redraws with \r: keep only the last state of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def status(root: DataRoot, name: str) -> Status:
    """What the UI shows for model `name`, read from its files."""
    st = Status(name=name)
    model = root.model(name)
    events, _ = EventLog(model.path).read(0)
    job = _read_job(root)
    is_job = bool(job) and job.get("name") == name
    st.running = is_job and _job_alive(job)
    losses = []
    for e in events:
        kind = e.get("kind")
        if kind == "start":
            st.total_steps = int(e.get("total_steps") or 0)
            st.epochs = int(e.get("epochs") or 0)
            st.step = int(e.get("step") or 0)
            st.state = "running"
        elif kind == "class_images":
            st.class_images = (e.get("done", 0), e.get("total", 0))
            st.state = "running"
        elif kind == "step":
            st.step = int(e.get("step") or st.step)
            st.epoch = int(e.get("epoch") or st.epoch)
            for key in ("loss", "lr", "it_per_s", "eta_s", "memory_mb"):
                if e.get(key) is not None:
                    setattr(st, key, e[key])
            if e.get("loss") is not None:
                losses.append((st.step, float(e["loss"])))
        elif kind == "sample":
            st.samples.extend(str(p) for p in e.get("paths", []))
        elif kind == "checkpoint":
            st.checkpoints.append(str(e.get("path")))
        elif kind == "paused":
            st.state = "paused"
        elif kind == "resumed":
            st.state = "running"
        elif kind in END_KINDS:
            st.state = kind
            st.step = int(e.get("step") or st.step)
            st.message = str(e.get("message") or "")
            if kind == "error":
                st.log_tail = str(e.get("log_tail") or "")
    stride = max(1, len(losses) // MAX_CHART_POINTS)
    st.losses = losses[::stride]
    ended = st.state in END_KINDS
    if st.running and st.state == "idle":
        st.state = "starting"
    elif is_job and not st.running and not ended:
        # The process is gone without saying goodbye: killed, out of memory, or a failure before it could log.
        code = job.get("returncode")
        st.state = "error"
        st.message = "the training process stopped without finishing" + (f" (exit code {code})" if code is not None else "")
        st.log_tail = log_tail(root, name)
        errors = [line[len("error: "):] for line in st.log_tail.splitlines() if line.startswith("error: ")]
        if errors:
            st.message = errors[-1]
    elif not is_job and events and not ended:
        st.state = "error"
        st.message = "the last training stopped without finishing"
        st.log_tail = log_tail(root, name)
    if st.state == "error" and not st.log_tail:
        st.log_tail = log_tail(root, name)
    return st


# ---------------------------------------------------------------- models


def create(root: DataRoot, name: str, source: str, family: str = "auto", overwrite: bool = False) -> str:
    """Create a model in a child process (a real checkpoint is gigabytes; the host process stays lean)."""
    root.model(name)  # name check before any work
    if not str(source).strip():
        raise UserError("source: choose a checkpoint, a file, a diffusers folder or a hub id")
    job = running_job(root)
    if job and job.get("name") == name:
        raise JobRunningError(f"model {name!r} is training; cancel it before replacing it")
    args = ["create", name, "--source", str(source).strip(), "--family", family or "auto"]
    return run_cli(root, *(args + (["--overwrite"] if overwrite else [])))


def export(root: DataRoot, name: str, fmt: str, half: bool, ema: bool, host: Host | None = None) -> str:
    """Export the working model as one checkpoint file (child process), then refresh the host's list."""
    if not root.model(name).exists():
        raise UserError(f"model {name!r}: not found")
    job = running_job(root)
    if job and job.get("name") == name:
        raise JobRunningError(f"model {name!r} is training; use 'Save now' to write a checkpoint while it runs")
    out = run_cli(root, "export", name, "--format", fmt, *(["--half"] if half else []), *(["--ema"] if ema else []))
    if host is not None:
        host.checkpoints_changed()
    return out


def delete_model(root: DataRoot, name: str) -> None:
    model = root.model(name)
    if not model.path.is_dir():
        raise UserError(f"model {name!r}: not found")
    job = running_job(root)
    if job and job.get("name") == name:
        raise JobRunningError(f"model {name!r} is training; cancel it before deleting it")
    shutil.rmtree(model.path)
