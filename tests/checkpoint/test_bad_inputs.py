"""Bad input: one clear line naming the problem, a non-zero exit, and nothing half-created."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreambooth import cli
from dreambooth.checkpoint import tensorio
from dreambooth.checkpoint.export import write_single_file

from webui_safe import check_zip_filenames


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _leftovers(root: Path) -> list[str]:
    folder = root / "models" / "dreambooth"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _bad_sources(tmp_path, tiny_sources) -> dict:
    good = tiny_sources["v1"].read_bytes()
    (tmp_path / "notes.safetensors").write_text("hello, not a checkpoint")
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"a": torch.zeros(2)}}, str(tmp_path / "whole.ckpt"))
    whole = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) - 200])
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "unknown.safetensors"))
    save_file({"model_ema.diffusion_modelout2weight": torch.zeros(3), "first_stage_model.quant_conv.bias": torch.zeros(8)},
              str(tmp_path / "emaonly.safetensors"))
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "badyaml.safetensors").write_bytes(good)
    from safetensors.torch import load_file
    for cut, key in (("cut1", "model.diffusion_model.input_blocks.1.0.out_layers.3.weight"),
                     ("cut2", "first_stage_model.decoder.mid.attn_1.q.weight")):
        tensors = load_file(str(tiny_sources["v1"]))
        del tensors[key]
        save_file(tensors, str(tmp_path / f"{cut}.safetensors"))
    (tmp_path / "badyaml.yaml").write_text("model: [unclosed")
    return {
        "missing.safetensors": "no such file",
        "notes.safetensors": "not a checkpoint",
        "truncated.safetensors": "truncated",
        "random.ckpt": "not a checkpoint",
        "truncated.ckpt": "truncated",
        "unknown.safetensors": "unknown checkpoint layout",
        "emaonly.safetensors": "only EMA weights",
        "folder.safetensors": "cannot load as a diffusers model",
        "badyaml.safetensors": "not a readable model yaml",
        "cut1.safetensors": "unknown checkpoint layout",
        "cut2.safetensors": "the vae lacks 1 tensors",
    }


def test_bad_sources(tmp_path, tiny_sources, capsys):
    root = tmp_path / "root"
    for name, message in _bad_sources(tmp_path, tiny_sources).items():
        code, err = _run(capsys, "--root", str(root), "create", "m", "--source", str(tmp_path / name))
        assert code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert _leftovers(root) == [], name


def test_bad_names_and_existing_models(tmp_path, tiny_sources, capsys):
    root = tmp_path / "root"
    src = str(tiny_sources["v1"])
    for name, message in (("a/b", "path separators"), ("..", ".."), ("x..y", ".."), ("con", "reserved"),
                          ("NUL.txt", "reserved"), ("", "empty")):
        code, err = _run(capsys, "--root", str(root), "create", name, "--source", src)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
    assert _leftovers(root) == []
    assert _run(capsys, "--root", str(root), "create", "m", "--source", src)[0] == 0
    before = (root / "models/dreambooth/m/config.json").read_text()
    code, err = _run(capsys, "--root", str(root), "create", "m", "--source", str(tiny_sources["sdxl"]))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    # A failing --overwrite keeps the old model; a working one replaces it.
    code, err = _run(capsys, "--root", str(root), "create", "m", "--overwrite", "--source", str(tmp_path / "nope.ckpt"))
    assert code == 2 and (root / "models/dreambooth/m/config.json").read_text() == before
    assert _run(capsys, "--root", str(root), "create", "m", "--overwrite", "--source", str(tiny_sources["sdxl"]))[0] == 0
    assert '"sdxl"' in (root / "models/dreambooth/m/config.json").read_text()
    assert _leftovers(root) == ["m"]
    code, err = _run(capsys, "--root", str(root), "export", "nothere")
    assert code == 2 and "not found" in err
    code, err = _run(capsys, "--root", str(root), "export", "m", "--ema")
    assert code == 2 and "EMA" in err
    code, err = _run(capsys, "--root", str(root), "export", "m", "--format", "ckpt", "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "must be named *.ckpt" in err and not (tmp_path / "x.safetensors").exists()


def test_a_failed_export_leaves_no_partial_file(created, tmp_path, monkeypatch):
    root, name = created["v1"]
    working = root.model(name).working
    calls = {"n": 0}
    real = tensorio.Entry.tensor

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("disk full")
        return real(self)

    monkeypatch.setattr(tensorio.Entry, "tensor", failing)
    for fmt in ("safetensors", "ckpt"):
        out = tmp_path / f"model.{fmt}"
        out.write_bytes(b"previous file")
        calls["n"] = 0
        with pytest.raises(OSError):
            write_single_file(working, out, fmt=fmt)
        assert out.read_bytes() == b"previous file"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_the_webui_check_rejects_plain_torch_save(tmp_path):
    """Why the .ckpt writer rewrites torch.save's archive: newer torch adds records the webui refuses."""
    import zipfile

    torch.save({"state_dict": {"a": torch.zeros(2)}}, str(tmp_path / "plain.ckpt"))
    names = zipfile.ZipFile(tmp_path / "plain.ckpt").namelist()
    if not any(n.endswith((".format_version", ".storage_alignment")) for n in names):
        pytest.skip("this torch writes no records beyond the webui's allowlist")
    with pytest.raises(Exception, match="bad file inside"):
        check_zip_filenames("plain.ckpt", names)


@pytest.mark.slow
def test_cli_in_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBOOTH_ROOT": str(tmp_path / "root")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dreambooth", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    done = run("tiny-checkpoint", "--family", "v1", "--out", str(tmp_path / "t.safetensors"), "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.safetensors").stat().st_size < 20_000_000 and (tmp_path / "t.yaml").is_file()
    failed = run("create", "bad/name", "--source", str(tmp_path / "t.safetensors"))
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [failed.stderr.strip()]
    assert "path separators" in failed.stderr


@pytest.mark.slow
def test_a_killed_export_leaves_the_previous_file(created, tmp_path):
    """SIGKILL in the middle of writing: the final name still holds the previous file, never a partial one."""
    import signal
    import time

    root, name = created["v1"]
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous file")
    script = (
        "import sys, time\n"
        "from dreambooth.checkpoint import tensorio\n"
        "from dreambooth.checkpoint.export import write_single_file\n"
        "real = tensorio.Entry.tensor\n"
        "def slow(self):\n"
        "    time.sleep(0.02)\n"
        "    return real(self)\n"
        "tensorio.Entry.tensor = slow\n"
        "write_single_file(sys.argv[1], sys.argv[2])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(root.model(name).working), str(out)])
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert out.read_bytes() == b"previous file"
