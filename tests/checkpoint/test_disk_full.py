"""A full disk (or a refused write) while exporting: one line "disk full while writing X; the previous file is intact",
a non-zero exit, the previous file byte for byte, no temporary file left behind. Unit tier: the writes are made to fail
with ENOSPC; slow tier: a real tmpfs that is too small (mounted by the test when it runs as root)."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import torch

from dreambooth import cli
from dreambooth.checkpoint import tensorio
from dreambooth.checkpoint.export import write_entries
from dreambooth.errors import UserError, WriteError
from dreambooth.store import DataRoot


def entries():
    """Three tensors (3.6 MB), written the way export writes a model."""
    return [tensorio.Entry(f"model.diffusion_model.w{i}", (300, 1000), torch.float32,
                           lambda i=i: torch.full((300, 1000), float(i))) for i in range(1, 4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.models import create_model

    folder = tmp_path_factory.mktemp("disk_full")
    root = DataRoot(folder / "root").ensure()
    create_model(root, "m", str(write_tiny_checkpoint("v1", folder / "tiny.safetensors", seed=0)))
    return root


class FullFile:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_after(monkeypatch, room: int):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f, room) if "w" in mode else f

    monkeypatch.setattr(tensorio, "open", full_open, raising=False)


def leftovers(folder: Path, keep: str) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name != keep and not p.name.endswith(".yaml"))


CASES = {  # name -> (format, how the disk fills up)
    "safetensors, header": ("safetensors", 100),
    "safetensors, tensors": ("safetensors", 2_000_000),
    "ckpt, torch.save": ("ckpt", 3_000_000),
    "ckpt, archive copy": ("ckpt", None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("previous", [True, False])
def test_disk_full_while_exporting(tmp_path, monkeypatch, case, previous):
    fmt, room = CASES[case]
    if room is None:  # torch.save succeeded, copying its records into the final archive fails
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(tensorio, "_write_aligned", full)
    else:
        fill_disk_after(monkeypatch, room)
    out = tmp_path / f"m.{fmt}"
    if previous:
        out.write_bytes(b"the previous checkpoint")
    with pytest.raises(WriteError) as e:
        write_entries(out, entries(), fmt, {"modelspec.title": "m"}, "model: {}\n")
    kept = "the previous file is intact" if previous else "no partial file was left"
    assert str(e.value) == f"disk full while writing {out}; {kept}"
    assert leftovers(tmp_path, out.name) == []
    if previous:
        assert out.read_bytes() == b"the previous checkpoint"
    else:
        assert not out.exists()


def test_a_refused_write_is_one_line_too(tmp_path, monkeypatch):
    real_open = open

    def refuse(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tensorio, "open", refuse, raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*m.safetensors \(Permission denied\); no partial file"):
        write_entries(tmp_path / "m.safetensors", entries(), "safetensors", None, None)
    assert list(tmp_path.iterdir()) == []
    err = WriteError("x")
    assert isinstance(err, UserError) and isinstance(err, OSError)  # the trainer's save handling catches it as well


def test_the_yaml_beside_it_fails_alone(tmp_path, monkeypatch):
    from dreambooth.checkpoint import export

    real = export.atomic_path
    out = tmp_path / "m.safetensors"

    @contextlib.contextmanager
    def full_for_yaml(path):
        with real(path) as tmp:
            if Path(path).suffix == ".yaml":
                raise OSError(errno.ENOSPC, "No space left on device")
            yield tmp

    monkeypatch.setattr(export, "atomic_path", full_for_yaml)
    with pytest.raises(WriteError, match="disk full while writing .*m.yaml; no partial file was left"):
        write_entries(out, entries(), "safetensors", None, "model: {}\n")
    assert tensorio.SafetensorsSource([out]).get("model.diffusion_model.w2")[0, 0] == 2.0  # the checkpoint is whole


def mount_tmpfs(folder: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the unit tests above cover disk full with failing writes)")
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,size", [("safetensors", "1m"), ("safetensors", "8m"), ("ckpt", "1m"), ("ckpt", "20m")])
def test_real_full_disk_on_a_small_tmpfs(model, fmt, size, capsys):
    """The CLI's export of a real (tiny) model onto a tmpfs that is too small."""
    # 1m: the first tensor write fails; 8m: half way; ckpt 20m: torch.save's archive fits, the final copy does not
    folder = Path("/tmp") / f"dreambooth-full-{uuid.uuid4().hex[:8]}"
    mount_tmpfs(folder, size)
    try:
        out = folder / f"m.{fmt}"
        out.write_bytes(b"previous")
        code = cli.main(["--root", str(model.root), "export", "m", "--format", fmt, "--no-half", "--out", str(out),
                         "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: disk full while writing {out}; the previous file is intact\n", err
        assert out.read_bytes() == b"previous" and sorted(p.name for p in folder.iterdir()) == [out.name]
    finally:
        subprocess.run(["umount", str(folder)], check=False)
        folder.rmdir()


def test_extract_lora_on_a_full_disk_is_one_line_and_keeps_the_previous_file(model, tmp_path, monkeypatch, capsys):
    """safetensors raises its own error type (not an OSError) when the disk fills up under a LoRA."""
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    trained = model.model("trained")
    shutil.copytree(model.model("m").path, trained.path)
    weights = next((trained.working / "unet").glob("*.safetensors"))
    tensors = safetensors.torch.load_file(str(weights))
    tensors = {k: v + 0.01 if v.ndim == 2 else v for k, v in tensors.items()}  # "trained": the linear layers moved
    safetensors.torch.save_file(tensors, str(weights))

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "lora" / "m_lora.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    code = cli.main(["--root", str(model.root), "extract-lora", "trained", "--rank", "2", "--out", str(out),
                     "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: disk full while writing {out}; the previous file is intact\n", err
    assert out.read_bytes() == b"previous" and [p.name for p in out.parent.iterdir()] == [out.name]


def test_export_writes_what_the_models_own_checkpoints_are_unless_told(model, tmp_path):
    from safetensors.torch import load_file

    def dtypes(path):
        return {t.dtype for t in load_file(str(path)).values() if t.is_floating_point()}

    assert cli.main(["--root", str(model.root), "export", "m", "--out", str(tmp_path / "same.safetensors")]) == 0
    assert dtypes(tmp_path / "same.safetensors") == {torch.float16}  # save_half, as the trainer writes
    full = tmp_path / "full.safetensors"
    assert cli.main(["--root", str(model.root), "export", "m", "--no-half", "--out", str(full)]) == 0
    assert dtypes(full) == {torch.float32}
