"""Our LoRA, LoHa, LoKr and DoRA files through an independent reader written from the webui 1.10.1 Lora extension's
matching rules (webui_reader.py): every key lands on a module of the exported single-file model, and applying the
file the webui's way to the base checkpoint gives the checkpoint exported from the merged model."""
from __future__ import annotations

import pytest
import torch

import webui_reader
from lora_helpers import add_random_adapters, load_pipeline, peft_merged_state_dict

# fp32 everywhere; the webui adds up @ down x scale in its own order, peft merges B @ A x scale.
ATOL = RTOL = 1e-5


def _load(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


FACTORS = {"lora": {"lora_up.weight", "lora_down.weight"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}}


@pytest.mark.slow
@pytest.mark.parametrize("family,layers,kind", [
    ("v1", "attention", "lora"), ("v1", "attention+ff+conv", "lora"), ("v2", "attention", "lora"),
    ("v2", "attention+ff+conv", "lora"), ("sdxl", "attention", "lora"), ("sdxl", "attention+ff+conv", "lora"),
    ("v1", "attention+ff+conv", "loha"), ("v2", "attention", "loha"), ("sdxl", "attention+ff+conv", "loha"),
    ("v1", "attention+ff+conv", "lokr"), ("v2", "attention+ff+conv", "lokr"), ("sdxl", "attention", "lokr"),
    ("v1", "attention+ff+conv", "dora"), ("v2", "attention+ff+conv", "dora"), ("sdxl", "attention+ff+conv", "dora"),
])
def test_every_key_maps_to_a_module_and_applies_like_the_merged_model(lora_models, tmp_path, family, layers, kind):
    from dreambooth.checkpoint.convert import read_configs
    from dreambooth.checkpoint.export import write_single_file
    from dreambooth.lora.files import save_lora
    from dreambooth.lora.training import merged_state_dicts
    from dreambooth.lora.weights import adapters_of
    from dreambooth.models import export_model

    root, name = lora_models[family]
    working = root.model(name).working
    base_file = export_model(root, name, out=tmp_path / "base.safetensors")  # `python -m dreambooth export`

    pipe = load_pipeline(working, family)
    parts = add_random_adapters(pipe, family, layers, seed=11, kind=kind)
    weights = {part: adapters_of(module) for part, module in parts.items()}
    lora_file = save_lora(tmp_path / "lora.safetensors", family, read_configs(working, family)["unet"], weights,
                          half=False, layers=layers)
    # peft's own merge for its adapter types; DoRA's magnitude is ours (its merge is checked against the adapted
    # model's output in test_training_parts)
    merged = merged_state_dicts(parts) if kind == "dora" else {p: peft_merged_state_dict(m) for p, m in parts.items()}
    merged_file = write_single_file(working, tmp_path / "merged.safetensors", state_dicts=merged)

    lora, base, merged = _load(lora_file), _load(base_file), _load(merged_file)
    modules, unmatched = webui_reader.read(lora, base.keys())
    assert unmatched == []
    assert len(modules) == sum(len(a) for a in weights.values())
    magnitudes = [layer for layer, found in modules.values() if "dora_scale" in found]
    assert bool(magnitudes) == (kind == "dora")
    for _, found in modules.values():
        if kind == "dora":  # OpenCLIP's fused attention projections stay plain LoRA
            assert set(found) - {"dora_scale"} == FACTORS["lora"] | {"alpha"}
        elif kind == "lokr":  # each factor full or a low-rank pair, as the layer's shape made it
            assert "alpha" in found and {"lokr_w1", "lokr_w1_a"} & set(found) and {"lokr_w2", "lokr_w2_a"} & set(found)
        else:
            assert set(found) == FACTORS[kind] | {"alpha"}

    applied = webui_reader.apply(lora, base)
    assert applied.keys() == merged.keys()
    for key, expected in merged.items():
        assert torch.allclose(applied[key], expected.float(), atol=ATOL, rtol=RTOL), key
    # exactly the tensors of the adapted modules changed (OpenCLIP's q, k, v share one fused tensor)
    layers = webui_reader.webui_layers(base.keys())
    targets = {layers[layer][0] for layer, _ in modules.values()}
    assert {k for k in merged if not torch.equal(base[k], merged[k])} == targets


def test_the_reader_reports_keys_it_cannot_place():
    layers = {"diffusion_model_input_blocks_1_1_proj_in": ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
                                                           "weight")}
    keys = [v[0] for v in layers.values()]
    lora = {"lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0),
            "lora_unet_input_blocks_9_1_proj_in.alpha": torch.tensor(1.0),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    modules, unmatched = webui_reader.read(lora, keys)
    assert list(modules) == ["diffusion_model_input_blocks_1_1_proj_in"]
    assert sorted(unmatched) == ["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
                                 "lora_unet_input_blocks_9_1_proj_in.alpha"]
