"""tiny-checkpoint: seeded, small, in the release layout, with a yaml that describes it."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreambooth.checkpoint.tiny import write_tiny_checkpoint
from dreambooth.errors import UserError

from ldm_reference import clip_keys, unet_keys, vae_keys


def test_seeded_and_deterministic(tiny_sources, tmp_path):
    again = load_file(str(write_tiny_checkpoint("v1", tmp_path / "again.safetensors", seed=1)))
    other = load_file(str(write_tiny_checkpoint("v1", tmp_path / "other.safetensors", seed=2)))
    first = load_file(str(tiny_sources["v1"]))
    assert all(torch.equal(first[k], again[k]) for k in first)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert not torch.equal(first[key], other[key])


@pytest.mark.parametrize("fam", ["v1", "v2", "sdxl"])
def test_small_and_described_by_its_yaml(fam, tiny_sources):
    path = tiny_sources[fam]
    assert path.stat().st_size < 30_000_000
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    unet = (params.get("unet_config") or params.get("network_config"))["params"]
    # The UNet the yaml describes (as the original code would build it) has exactly the file's UNet tensors.
    tensors = load_file(str(path))
    prefix = "model.diffusion_model."
    ours = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    assert unet_keys(unet) == ours
    first = params["first_stage_config"]["params"]
    prefix = "first_stage_model."
    ours = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    assert vae_keys(first["ddconfig"], first["embed_dim"]) == ours


@pytest.mark.slow
def test_full_text_encoder_keeps_the_real_widths(tmp_path):
    path = write_tiny_checkpoint("v1", tmp_path / "full.safetensors", full_text_encoder=True)
    tensors = load_file(str(path))
    prefix = "cond_stage_model.transformer."
    ours = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    assert ours == clip_keys()  # exactly the CLIP ViT-L text tower the webui builds
    assert tensors["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 768


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="must end in .safetensors or .ckpt"):
        write_tiny_checkpoint("v1", tmp_path / "x.bin")
    with pytest.raises(UserError, match="family"):
        write_tiny_checkpoint("v3", tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
