"""Pickle-free on any stack (the webui's torch 2.1 unpickles by default): a diffusers folder is loaded from its
.safetensors weights only; pickle weights (.bin) are refused with a message that says how to convert them, unless the
user passes --allow-pickle-weights. A booby-trapped pickle shows whether anything was unpickled."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from dreambooth import cli
from dreambooth.models import _pickle_only_components


class Trap:
    """Unpickling this creates the marker file (standing in for code a malicious pickle would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def booby_trap(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weight": Trap(marker)}))


def pickle_only_folder(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "pickled"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text("{}")
    booby_trap(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    booby_trap(folder / "text_encoder" / "pytorch_model.bin", marker)
    return folder


def test_pickle_only_weights_are_refused_before_anything_loads(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    folder = pickle_only_folder(tmp_path, marker)
    assert _pickle_only_components(folder) == ["text_encoder", "unet"]
    code = cli.main(["--root", str(tmp_path / "root"), "create", "m", "--source", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "text_encoder, unet are only in pickle files" in err
    assert "save_pretrained(new_folder, safe_serialization=True)" in err and "--allow-pickle-weights" in err
    assert not marker.exists() and not (tmp_path / "root" / "models" / "dreambooth" / "m").exists()


@pytest.fixture(scope="module")
def safetensors_folder(tmp_path_factory):
    """A tiny v1 model as a standard diffusers folder (.safetensors weights)."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    tmp = tmp_path_factory.mktemp("pickle_free")
    root = DataRoot(tmp / "root").ensure()
    model = create_model(root, "base", str(write_tiny_checkpoint("v1", tmp / "tiny.safetensors", seed=0)))
    folder = tmp / "diffusers"
    shutil.copytree(model.working, folder)
    return folder


@pytest.mark.slow
def test_a_trapped_bin_beside_safetensors_is_never_opened(safetensors_folder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(safetensors_folder, folder)
    marker = tmp_path / "unpickled"
    booby_trap(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    booby_trap(folder / "text_encoder" / "pytorch_model.bin", marker)
    code = cli.main(["--root", str(tmp_path / "root"), "create", "m", "--source", str(folder)])
    assert code == 0, capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_allow_pickle_weights_loads_a_bin_folder(safetensors_folder, tmp_path, capsys):
    import diffusers

    folder = tmp_path / "bin"
    diffusers.DiffusionPipeline.from_pretrained(str(safetensors_folder)).save_pretrained(
        str(folder), safe_serialization=False)
    # (transformers 5 writes the text encoder as safetensors whatever it is asked; diffusers writes .bin)
    assert not list((folder / "unet").glob("*.safetensors")) and list((folder / "unet").glob("*.bin"))
    root = str(tmp_path / "root")
    assert cli.main(["--root", root, "create", "m", "--source", str(folder)]) == 2
    assert "--allow-pickle-weights" in capsys.readouterr().err
    assert cli.main(["--root", root, "create", "m", "--source", str(folder), "--allow-pickle-weights"]) == 0
    working = tmp_path / "root" / "models" / "dreambooth" / "m" / "working"
    assert list(working.rglob("*.safetensors")) and not list(working.rglob("*.bin"))  # the working copy is safe


@pytest.mark.slow
def test_the_loader_itself_is_told_safetensors_only(safetensors_folder, tmp_path, monkeypatch, capsys):
    """Even past the folder check (a hub model is not checked beforehand), diffusers and transformers are told to
    read .safetensors only: torch.load is never called on the pickle."""
    import torch

    from dreambooth import models

    folder = tmp_path / "te_pickled"
    shutil.copytree(safetensors_folder, folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    booby_trap(folder / "text_encoder" / "pytorch_model.bin", marker)
    loads = []

    def recording_load(*args, **kwargs):
        loads.append(args[:1])
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(models, "_pickle_only_components", lambda folder: [])
    code = cli.main(["--root", str(tmp_path / "root"), "create", "m", "--source", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and loads == [] and not marker.exists()
    error = [line for line in err.splitlines() if line.startswith("error: ")]  # (diffusers' progress bar aside)
    assert len(error) == 1 and "cannot load as a diffusers model" in error[0] and "--allow-pickle-weights" in error[0]
