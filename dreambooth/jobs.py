"""Process supervision: one training at a time per data root, in a child process, and how it goes.

The trainer is always `python -m dreambooth --root R train NAME` in its own process (and its own session, so it
survives a restart of the UI or the webui). Everything the UI shows is read back from files on each poll:

<root>/models/dreambooth/.job.json   the job this data root runs: {"name", "pid", "started"[, "returncode"]};
                                     one at a time (one GPU); stale when the pid is gone
<model>/logs/events.jsonl            the trainer's events (dreambooth.events), folded into the status
<model>/logs/train.log               the trainer's stdout and stderr; its tail is shown with an error
<model>/control/                     control requests (cancel, pause, save, sample)
<model>/.lock                        held by whichever process writes the model (store.ModelLock)

So a page reload, a second browser or a restarted UI simply re-attaches. Heavy one-off work (create, export, a memory
plan) also runs as a child process (`run_cli`): the host process (the webui) never loads training weights. What a
user can do with all this is in dreambooth.actions.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import validate_for_training
from .errors import UserError, WriteError
from .events import Checkpoint, Controls, Done, Error, EventLog, Follower, RunStatus
from .host import Host
from .models import load_config
from .store import DataRoot, ModelBusyError, atomic_write_text, check_model_name, read_bytes, writing_to

JOB_FILE = ".job.json"
LOG_TAIL_LINES = 25
# The folder that holds the `dreambooth` package: the child must import the same code, wherever it is installed
# (inside the webui it is only on sys.path because scripts/ put it there).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class JobRunningError(ModelBusyError):
    """A second training was asked for while one runs, or a model is asked to change while it trains."""


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


def trainer_command(root: DataRoot, name: str, settings: dict) -> list[str]:
    """The training process: always the real CLI (tests of the lock and crash handling swap in a small script),
    `settings` for this run only."""
    return _cli(root, "train", name, *(f"--set={k}={v}" for k, v in settings.items()))


def run_cli(root: DataRoot, *args: str, timeout: float | None = None, stop: Path | None = None) -> str:
    """Run a short CLI verb (create, export, plan) in a child process. It reports through its exit code and a
    one-event log (--report): Done carries what it printed, Error the one-line reason, which becomes a UserError
    here. The child is killed once `timeout` seconds have passed, or once the file `stop` exists."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dreambooth-report-") as tmp:
        report = EventLog(Path(tmp) / "report.jsonl")
        command = [sys.executable, "-m", "dreambooth", "--root", str(root.root), "--report", str(report.path), *args]
        proc = subprocess.Popen(command, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        stderr = _wait(proc, args[0], timeout, stop)
        events, _ = report.read()
    outcome = events[-1] if events else None
    if proc.returncode == 0 and isinstance(outcome, Done):
        return outcome.message
    if isinstance(outcome, Error):
        raise UserError(outcome.message)
    tail = " | ".join(line for line in (stderr or "").splitlines()[-LOG_TAIL_LINES:] if line.strip())
    raise UserError(f"`{' '.join(args[:2])}` failed (exit {proc.returncode}): {tail}")


def _wait(proc: subprocess.Popen, verb: str, timeout: float | None, stop: Path | None) -> str:
    """Wait for a child, reading its output as it comes (so a full pipe never blocks it), and return what it wrote
    to stderr; kill it when told to."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        try:
            return proc.communicate(timeout=0.25)[1]
        except subprocess.TimeoutExpired:
            stopped = stop is not None and stop.exists()
            if stopped or (deadline is not None and time.monotonic() > deadline):
                proc.kill()
                proc.communicate()
                raise UserError(f"`{verb}` was stopped" if stopped else f"`{verb}` took longer than {timeout:g} s; "
                                "stopped") from None


# ---------------------------------------------------------------- the job lock


def _job_path(root: DataRoot) -> Path:
    return root.dreambooth / JOB_FILE


def _read_job(root: DataRoot) -> dict | None:
    """The job file, None when there is none; a damaged one (not JSON, wrong types, a name that is no model's name,
    a folder or a FIFO in its place) reads as {"damaged": True} (never as free)."""
    try:
        job = json.loads(read_bytes(_job_path(root), limit=64 * 1024).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UserError, ValueError):
        return {"damaged": True}
    if not isinstance(job, dict) or not isinstance(job.get("pid"), int) or isinstance(job.get("pid"), bool):
        return {"damaged": True}
    try:
        check_model_name(job.get("name"))
    except UserError:
        return {"damaged": True}
    return job


def _job_alive(job: dict | None) -> bool:
    # While a start is claiming the lock, the pid is the starting process (the webui: not a `dreambooth` command).
    return bool(job) and _pid_alive(job.get("pid"), ours=not job.get("claiming"))


def _training_models(root: DataRoot) -> list[dict]:
    """{"name", "pid"} of each model whose lock a live process holds for training (whoever started it: the UI, the
    CLI, accelerate)."""
    busy = []
    for name in root.model_names():
        holder = root.model(name).lock("").holder()
        if holder is not None and holder.get("purpose") == "training":
            busy.append({"name": name, "pid": holder.get("pid"), "started": None})
    return busy


def running_job(root: DataRoot) -> dict | None:
    """The job that runs now ({"name", "pid", "started"}), or None."""
    job = _read_job(root)
    if job and job.get("damaged"):  # trust only the models' locks
        busy = _training_models(root)
        return busy[0] if busy else None
    return job if _job_alive(job) else None


def last_job(root: DataRoot) -> dict | None:
    """The running job, or the one that ran last (its file stays until the next start replaces it)."""
    job = _read_job(root)
    return job if job and isinstance(job.get("name"), str) else None


def recently_active(root: DataRoot, name: str, seconds: float = 10.0) -> bool:
    """True if the model's event log or the job file changed in the last `seconds` (a job that has just ended)."""
    changed = [p.stat().st_mtime for p in (root.model(name).events, _job_path(root)) if p.exists()]
    return bool(changed) and time.time() - max(changed) < seconds


def _claim(root: DataRoot, name: str) -> None:
    """Create the job file exclusively, replacing a stale one; refuse if a live job holds it."""
    path = _job_path(root)
    for _ in range(2):
        try:
            with writing_to(path):
                root.dreambooth.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            job = _read_job(root)
            if job and job.get("damaged"):
                busy = _training_models(root)
                if busy:
                    raise JobRunningError(f"a training is already running: {busy[0]['name']!r}; cancel it or wait "
                                          "until it ends") from None
            elif _job_alive(job):
                raise JobRunningError(f"a training is already running: {job.get('name')!r} (pid {job.get('pid')}); "
                                      "cancel it or wait until it ends") from None
            if path.is_dir() and not path.is_symlink():
                raise UserError(f"{path}: is a folder where the job file belongs; move it away") from None
            path.unlink(missing_ok=True)  # stale or damaged, and no model is training
            continue
        except OSError as e:
            raise WriteError.of(path, e) from e
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
    config = load_config(model)
    validate_for_training(config)
    holder = model.lock("").holder()
    if holder is not None:
        raise JobRunningError(f"model {name!r} is {holder.get('purpose') or 'in use'}; wait until it ends")
    busy = _training_models(root)  # started elsewhere (the CLI): one training per data root all the same
    if busy:
        raise JobRunningError(f"a training is already running: {busy[0]['name']!r}; cancel it or wait until it ends")
    _claim(root, name)
    try:
        with writing_to(model.logs):
            EventLog(model.events).clear()
            Controls(model.control).clear_all()
            model.logs.mkdir(parents=True, exist_ok=True)
            log_path = model.train_log
            if log_path.exists() or log_path.is_symlink():
                os.replace(log_path, log_path.with_suffix(".log.1"))
        if host is not None:
            host.before_training()
        popen_kw = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        with writing_to(log_path), open(log_path, "wb") as log:
            settings = host.run_settings(config.parameters) if host is not None else {}
            proc = subprocess.Popen(trainer_command(root, name, settings), stdout=log, stderr=subprocess.STDOUT,
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
        log, offset = EventLog(model.events), 0
        while True:
            ended = proc.poll() is not None if proc is not None else not _pid_alive(job["pid"])
            events, offset = log.read(offset)
            if host is not None:
                host.files_changed([e.path for e in events if isinstance(e, Checkpoint)])
            if ended:
                break
            time.sleep(0.5)
        if proc is not None:
            current = _read_job(root)
            if current and current.get("pid") == job["pid"]:
                atomic_write_text(_job_path(root), json.dumps({**current, "returncode": proc.returncode}))
        if host is not None:
            host.checkpoints_changed()
            host.loras_changed()
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
    controls = Controls(root.model(name).control)
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
class Status(RunStatus):
    """A model's run as the UI shows it: the fold of its events, plus what the process tells (alive, log tail)."""

    name: str = ""
    log_tail: str = ""  # the end of train.log (the trainer's own lines)
    running: bool = False  # a live process trains this model now

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# A progress-bar redraw: "training x:  40%|####      | 4/10 [00:01<00:02, 2.00step/s, loss=0.1]"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal cursor moves (nested bars)
TQDM_BAR = re.compile(r"^[^\n]*?\d+%\|[^|]*\|[^\[]*(\[[^\]]*\])?")


def log_tail(root: DataRoot, name: str, lines: int = LOG_TAIL_LINES) -> str:
    """The end of the trainer's own output (logs/train.log), without progress-bar redraws."""
    path = root.model(name).train_log
    try:
        size = path.stat().st_size
        text = read_bytes(path, offset=max(0, size - 64 * 1024)).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    except UserError as e:  # a folder or a FIFO where the log belongs: said instead of read
        return str(e)
    # tqdm redraws its bar with \r (a line of its own here); what another writer printed after a bar stays
    kept = [TQDM_BAR.sub("", ANSI.sub("", line)).rstrip() for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def status(root: DataRoot, name: str, follower: Follower | None = None) -> Status:
    """What the UI shows for model `name`: its events folded, checked against its process. A `follower` kept between
    calls (the tab's, the routes') reads only what the log gained since the last call."""
    model = root.model(name)
    try:
        folded, logged = (follower or Follower()).status(model.events)
    except UserError as e:  # a damaged log: the run's state cannot be told; say why in one line
        folded, logged = RunStatus(state="error", message=str(e)), True
    st = Status(**vars(folded), name=name)
    events = logged
    job = _read_job(root)
    is_job = bool(job) and job.get("name") == name
    st.running = is_job and _job_alive(job)
    if st.running and st.state == "idle":
        st.state = "starting"
    elif is_job and not st.running and not st.ended:
        # The process is gone without saying goodbye: killed, out of memory, or a failure before it could log.
        code = job.get("returncode")
        st.state = "error"
        st.message = "the training process stopped without finishing" + (f" (exit code {code})" if code is not None else "")
    elif not is_job and events and not st.ended:
        st.state = "error"
        st.message = "the last training stopped without finishing"
    st.log_tail = log_tail(root, name)
    if st.ended and not st.losses:  # a run that trained nothing ("nothing to do"): the last run's chart stays
        try:
            st.losses = (follower or Follower()).status(model.events.with_suffix(".jsonl.1"))[0].losses
        except UserError:
            pass
    return st
