"""Full size, on the meta device: the real SD1.5, SD2.1 (512 and 768-v) and SDXL base architectures.

The original releases' key names and shapes come from ldm_reference (built module by module from the reference
yamls, independently of the product's key table). Import must read the right diffusers configs from those shapes
and map every tensor onto the diffusers model; export from a plain diffusers model must give back exactly the
release's keys and shapes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dreambooth.checkpoint.convert import (canonical_key, configs_from_single_file, meta_model, plan_export,
                                           plan_import)
from dreambooth.checkpoint.tensorio import TensorSource

from ldm_reference import release_keys

# The original releases' inference yamls, as the package ships them (their SHA-256 is checked below against the
# released files'), and the CLIP BPE vocabulary.
RELEASE_YAMLS = Path(__file__).resolve().parents[2] / "dreambooth" / "resources" / "ldm"
RELEASE_SHA256 = {
    "v1-inference.yaml": "1e1f2fe98489309e3c2ab847c720f8cb016807c39ffdaea3df5dc7358991baa9",
    "v2-inference.yaml": "ec4094bd36ef558cd9d52c9985471ac91d2c0c5bd071717411a4ccd5adf4f311",
    "v2-inference-v.yaml": "72b092aadfe146f5d3f395a720c0aa3b2354b2095e3f10dc18f0e9716d286dcb",
    "sd_xl_base.yaml": "4bd61f9d429423a80690137a93cc01f39a039ae4b5115b322c3b524b86763d7d",
    "bpe_simple_vocab_16e6.txt.gz": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
}
RELEASES = {"v1": "v1-inference.yaml", "v2": "v2-inference.yaml", "v2-v": "v2-inference-v.yaml",
            "sdxl": "sd_xl_base.yaml"}


class ShapeSource(TensorSource):
    """Names and shapes only: nothing is ever loaded."""

    def __init__(self, shapes: dict):
        self.shapes = shapes

    def keys(self):
        return list(self.shapes)

    def __contains__(self, key):
        return key in self.shapes

    def shape(self, key):
        return tuple(self.shapes[key])

    def dtype(self, key):
        return torch.float16

    def get(self, key):
        raise AssertionError("a full-size test must not load tensors")


def _release(fam):
    path = RELEASE_YAMLS / RELEASES[fam]
    return release_keys(path), yaml.safe_load(path.read_text())


@pytest.mark.parametrize("fam", list(RELEASES))
def test_import_reads_the_release_architecture(fam):
    shapes, yaml_data = _release(fam)
    configs = configs_from_single_file(ShapeSource(shapes), fam, yaml_data)
    unet = configs["unet"]
    assert unet["layers_per_block"] == 2
    if fam == "sdxl":
        assert unet["block_out_channels"] == [320, 640, 1280]
        assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        assert unet["transformer_layers_per_block"] == [1, 2, 10]
        assert unet["attention_head_dim"] == [5, 10, 20] and unet["cross_attention_dim"] == 2048
        assert unet["addition_time_embed_dim"] == 256 and unet["projection_class_embeddings_input_dim"] == 2816
        assert configs["text_encoder_2"]["num_hidden_layers"] == 32
        assert configs["text_encoder_2"]["projection_dim"] == 1280
        assert configs["vae"]["scaling_factor"] == 0.13025
    else:
        assert unet["block_out_channels"] == [320, 640, 1280, 1280]
        assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        if fam == "v1":
            assert unet["attention_head_dim"] == [8] * 4 and not unet["use_linear_projection"]
            assert unet["cross_attention_dim"] == 768 and configs["text_encoder"]["num_hidden_layers"] == 12
        else:  # SD 2 conditions on OpenCLIP's penultimate layer: diffusers keeps 23 of 24
            assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"]
            assert unet["cross_attention_dim"] == 1024 and configs["text_encoder"]["num_hidden_layers"] == 23
            assert configs["text_encoder"]["hidden_act"] == "gelu"
    plans, extras = plan_import(ShapeSource(shapes), fam, configs)
    extra_keys = {e.key for e in extras}
    if fam == "v1":
        assert extra_keys == set()
    elif fam == "sdxl":
        assert extra_keys == {"conditioner.embedders.1.model.logit_scale"}
    else:
        prefix = "cond_stage_model.model."
        assert {prefix + "text_projection", prefix + "logit_scale"} <= extra_keys
        assert all(k.startswith(prefix + "transformer.resblocks.23.") for k in extra_keys - {prefix + "text_projection", prefix + "logit_scale"})
        assert len(extra_keys) == 2 + 12


@pytest.mark.parametrize("fam", list(RELEASES))
def test_export_gives_the_release_keys_and_shapes(fam):
    shapes, yaml_data = _release(fam)
    configs = configs_from_single_file(ShapeSource(shapes), fam, yaml_data)
    sources = {}
    for component, config in configs.items():  # a plain diffusers model, as a hub folder would hold it
        state = meta_model(component, config, fam).state_dict()
        sources[component] = ShapeSource({canonical_key(component, k): tuple(v.shape) for k, v in state.items()})
    entries = plan_export(fam, configs, sources, extras=None, include_ema=False, half=True)
    exported = {e.key: e.shape for e in entries}
    assert set(exported) - set(shapes) == set()
    assert set(shapes) - set(exported) == set()
    assert exported == shapes
    assert all(e.dtype == torch.float16 for e in entries)


@pytest.mark.parametrize("fam", list(RELEASES))
def test_yaml_only_where_a_host_could_not_guess(fam):
    from dreambooth.checkpoint.layout import render_yaml

    shapes, yaml_data = _release(fam)
    configs = configs_from_single_file(ShapeSource(shapes), fam, yaml_data)
    text, needed = render_yaml(fam, configs["unet"], configs["vae"])
    assert needed == (fam == "v2-v")  # standard widths: hosts guess them; v-prediction they cannot
    assert yaml.safe_load(text) == yaml_data


def test_the_package_ships_its_own_copies_of_the_reference_data():
    from dreambooth.families import BPE_PATH, RESOURCES, clip_vocab_and_merges

    import hashlib

    for name in RELEASES.values():
        assert hashlib.sha256((RESOURCES / "ldm" / name).read_bytes()).hexdigest() == RELEASE_SHA256[name], name
    assert hashlib.sha256(BPE_PATH.read_bytes()).hexdigest() == RELEASE_SHA256[BPE_PATH.name]
    assert (RESOURCES / "CLIP_BPE_LICENSE.txt").is_file()
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
