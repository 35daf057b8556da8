"""A create or an export killed (SIGKILL) while its temporary folder or file holds weights leaves nothing behind once
the next operation on that data root runs, and that operation says how much it reclaimed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth import actions

pytestmark = pytest.mark.slow  # real create and export processes

REPO = Path(__file__).resolve().parents[2]


def cli(root, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dreambooth", "--root", str(root.root), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, written) -> bool:
    """SIGKILL `proc` as soon as `written()` finds its temporary weights; False if it finished first."""
    while proc.poll() is None:
        if written():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def temp_weights(folder: Path, pattern: str) -> bool:
    return any(p.stat().st_size > 0 for p in folder.glob(pattern) if p.is_file())


@pytest.fixture
def tiny(tmp_path):
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint("v1", tmp_path / "tiny.safetensors", seed=0)


def test_a_killed_create_leaves_nothing_once_the_next_create_runs(data_root, tiny):
    for _ in range(5):
        proc = cli(data_root, "create", "dog", "--source", str(tiny))
        if kill_when(proc, lambda: temp_weights(data_root.dreambooth, ".dog.*.creating/working/*/*")):
            break
        actions.delete(data_root, "dog", True)
    else:
        pytest.fail("create finished every time before it could be killed")
    left = [p for p in data_root.dreambooth.glob(".dog.*.creating")]
    assert left and not data_root.model("dog").exists()
    size = sum(f.stat().st_size for p in left for f in p.rglob("*") if f.is_file())

    said = actions.create(data_root, "dog", str(tiny)).message  # as the tab does it
    assert "Reclaimed" in said and hidden(data_root.dreambooth) == [], said
    assert data_root.model("dog").exists()
    assert f"{size / 1e3:.1f} KB" in said or f"{size / 1e6:.1f} MB" in said, (said, size)


def test_a_killed_export_leaves_nothing_once_the_next_export_runs(data_root, tiny):
    actions.create(data_root, "dog", str(tiny))
    out = data_root.checkpoints
    for _ in range(5):
        proc = cli(data_root, "export", "dog")
        if kill_when(proc, lambda: temp_weights(out, ".dog_0.safetensors.*.tmp")):
            break
        (out / "dog_0.safetensors").unlink()
    else:
        pytest.fail("export finished every time before it could be killed")
    assert hidden(out) and not (out / "dog_0.safetensors").exists()

    proc = cli(data_root, "export", "dog")
    printed, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Reclaimed" in printed.splitlines()[0], printed
    assert hidden(out) == [] and (out / "dog_0.safetensors").is_file()


def test_start_over_after_a_killed_start_over_keeps_the_class_images(data_root, tiny):
    """A start-over killed while it held the class images aside leaves them in models/dreambooth/.NAME...kept; the
    next one puts them back instead of failing."""
    actions.create(data_root, "dog", str(tiny))
    model = data_root.model("dog")
    kept = data_root.dreambooth / ".dog.class_images.kept"
    (kept / "a_dog-1234").mkdir(parents=True)
    (kept / "a_dog-1234" / "00000.png").write_bytes(b"a class image")
    said = actions.back_to_source(data_root, "dog")
    assert "step 0" in said and not kept.exists()
    assert (model.class_images / "a_dog-1234" / "00000.png").read_bytes() == b"a class image"
