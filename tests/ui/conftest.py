"""The standalone app as a real server process, and headless Chromium (Debian's; Playwright never downloads one).
Helpers for driving the page live in page_helpers.py (put on sys.path here for importlib mode)."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float = 120) -> None:
    """Until `url` answers; fails with the end of the server's log when it exits first or never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{what} did not answer:\n{log.read_text()[-3000:]}")


class App:
    def __init__(self, python: str, root: Path, log: Path, args=()):
        self.root, self.port, self.log = root, free_port(), log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([python, "-m", "dreambooth", "--root", str(root), "ui", "--port", str(self.port),
                                      *args], cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        wait_until_serving(self.proc, self.url, log, "the app")

    def stop(self):
        from dreambooth import jobs
        from dreambooth.store import DataRoot

        job = jobs.running_job(DataRoot(self.root))
        if job:  # a failed test must not leave its trainer running
            os.kill(job["pid"], signal.SIGKILL)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


STACKS = {  # gradio version: (variable naming its python, the environment .ci/setup builds)
    "3.41": ("DREAMBOOTH_GRADIO3_PYTHON", ".venv-webui"),
    "4.40": ("DREAMBOOTH_GRADIO4_PYTHON", ".venv-forge"),
}


def _stack_python(version: str) -> str:
    variable, folder = STACKS[version]
    python = os.environ.get(variable)
    if python:
        return python
    local = REPO / folder / "bin" / "python"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{variable} is not set: CI must test the gradio {version} stack")
    if not local.exists():
        pytest.skip(f"no gradio {version} environment here (set {variable})")
    return str(local)


@pytest.fixture
def stack_python():
    """stack_python(gradio version) -> the python of that stack's environment (skips where it is absent)."""
    return _stack_python


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout): poll until predicate() is truthy and return its value; fail after timeout."""
    def wait(predicate, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError("condition not reached in time")

    return wait


@pytest.fixture
def start_app(tmp_path):
    apps = []

    def start(python: str = sys.executable, root: Path | None = None, args=()) -> App:
        app = App(python, root or tmp_path / "root", tmp_path / f"app{len(apps)}.log", args)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/setup does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield context.new_page()
    context.close()
