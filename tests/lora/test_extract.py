"""LoRA extraction from a full fine-tune: full rank reproduces the change exactly (checked through the independent
webui reader against the trained model's own export), lower ranks report a larger error, and bad input is refused."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import webui_reader
from dreambooth.errors import UserError

FULL_RANK = {"v1": (64, 32), "sdxl": (64, 64)}  # the tiny models' widest layers: UNet 64 channels, CLIP 32 / 64 wide


def fine_tune(working, parts=("unet", "text_encoder"), scale=0.01, seed=0, step=5):
    """Stand in for a full fine-tune: a random full-rank change to every weight of `parts`, saved as training saves."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    for part in parts:
        for path in (working / part).glob("*.safetensors"):
            tensors = load_file(str(path))
            for key, t in tensors.items():
                if t.is_floating_point() and t.dim() >= 2:
                    tensors[key] = t + scale * torch.randn(t.shape, generator=generator)
            save_file(tensors, str(path), metadata={"format": "pt"})
    (working / "training.json").write_text(json.dumps({"step": step, "epoch": 1}))


@pytest.fixture
def trained(tmp_path, request):
    """{family: (root, name)} of a freshly created and 'fine-tuned' tiny model per family asked for."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    def make(family, parts=("unet", "text_encoder"), name="ft"):
        root = DataRoot(tmp_path / "root").ensure()
        source = write_tiny_checkpoint(family, tmp_path / f"{family}-{name}.safetensors", seed=5,
                                       unet_layers_per_block=2 if family != "sdxl" else 1)
        create_model(root, name, str(source))
        fine_tune(root.model(name).working, parts)
        return root, name, source
    return make


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v1", "sdxl"])
def test_full_rank_reproduces_the_change_and_lower_ranks_lose_more(trained, tmp_path, family):
    from safetensors.torch import load_file

    from dreambooth.lora.extract import extract_model_lora
    from dreambooth.models import export_model

    parts = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    root, name, source = trained(family, parts)
    rank, te_rank = FULL_RANK[family]
    path, extraction = extract_model_lora(root, name, rank, te_rank, half=False)
    suffix = f"_te{te_rank}" if te_rank != rank else ""
    assert path == root.lora / f"{name}_5_extract_r{rank}{suffix}.safetensors"
    assert set(extraction.errors) == set(parts) and all(e < 1e-5 for e in extraction.errors.values())

    lora = load_file(str(path))
    base = load_file(str(source))
    applied = webui_reader.apply(lora, base)
    expected = load_file(str(export_model(root, name, out=tmp_path / "trained.safetensors")))
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert changed
    for key in changed:  # the extracted LoRA on the base checkpoint gives the trained weights
        if key in applied and not key.startswith("first_stage_model."):
            if torch.allclose(applied[key], expected[key], atol=1e-4, rtol=1e-4):
                continue
            # the extraction covers the layers LoRA can adapt; other trained tensors (norms, embeddings) stay base
            assert torch.equal(applied[key], base[key]), key

    errors = []
    for r in (1, 2, 4, 8):
        _, low = extract_model_lora(root, name, r, r, out=tmp_path / f"r{r}.safetensors")
        errors.append(low.errors)
    for part in parts:
        series = [e[part] for e in errors]
        assert all(a > b for a, b in zip(series, series[1:])), (part, series)
        assert 0 < series[-1] < series[0] < 1


@pytest.mark.slow
def test_a_text_encoder_that_never_trained_is_left_out(trained):
    from dreambooth.lora.extract import extract_model_lora
    from lora_helpers import read_lora

    root, name, _ = trained("v1", parts=("unet",))
    path, extraction = extract_model_lora(root, name, 4)
    assert extraction.unchanged == ["text_encoder"] and list(extraction.weights) == ["unet"]
    tensors, meta = read_lora(path)
    assert not any(k.startswith("lora_te") for k in tensors)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    report = json.loads(meta["dreambooth.extraction"])
    assert report["unchanged"] == ["text_encoder"] and 0 < report["relative_error"]["unet"] < 1
    assert "text_encoder: unchanged by training" in extraction.report()


@pytest.mark.slow
def test_bad_input_is_one_clear_error(trained, capsys):
    from dreambooth.cli import main
    from dreambooth.lora.extract import extract_model_lora

    root, name, source = trained("v1")
    for rank, te_rank, words in [(0, None, "--rank: must be a whole number of at least 1"),
                                 (65, None, "--rank: 65 is above the width of the widest layer (64)"),
                                 (4, 0, "--te-rank: must be a whole number"),
                                 (4, 33, "--te-rank: 33 is above the width of the widest layer (32)")]:
        with pytest.raises(UserError, match=re.escape(words)):
            extract_model_lora(root, name, rank, te_rank)
    with pytest.raises(UserError, match="model 'nope': not found"):
        extract_model_lora(root, "nope", 4)

    assert main(["--root", str(root.root), "extract-lora", name, "--rank", "0"]) == 2
    assert "error: --rank: must be a whole number" in capsys.readouterr().err
    assert main(["--root", str(root.root), "extract-lora", name, "--rank", "2", "--te-rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "unet: rank 2" in out and "text_encoder: rank 1" in out
    assert (root.lora / f"{name}_5_extract_r2_te1.safetensors").is_file()

    moved = source.with_name("moved.safetensors")
    shutil.move(source, moved)
    with pytest.raises(UserError, match="base checkpoint '.*' is gone"):
        extract_model_lora(root, name, 4)
    leftovers = [p.name for p in root.lora.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # nothing half-written


@pytest.mark.slow
def test_an_untrained_model_has_nothing_to_extract(tmp_path):
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.lora.extract import extract_model_lora
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    root = DataRoot(tmp_path / "root").ensure()
    create_model(root, "fresh", str(write_tiny_checkpoint("v1", tmp_path / "v1.safetensors")))
    with pytest.raises(UserError, match="nothing to extract"):
        extract_model_lora(root, "fresh", 4)
