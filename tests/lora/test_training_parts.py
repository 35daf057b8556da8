"""The trainer's LoRA pieces on small modules, for each adapter type (LoRA, LoHa, LoKr): what trains, the learning
rates, saving and resuming adapters, the preview weight, and the merged weights."""
from __future__ import annotations

import pytest
import torch

from dreambooth.config import Parameters
from dreambooth.errors import UserError

pytestmark = pytest.mark.slow  # diffusers, transformers and peft take seconds to import


def _modules(seed=0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8))
    return unet, te


def _run(unet, te):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (1, 8), generator=g)
    with torch.no_grad():
        context = te(ids)[0]
        return unet(torch.randn(1, 4, 8, 8, generator=g), 10, context).sample


def _adapter(name: str) -> bool:
    from dreambooth.lora.weights import PEFT_PARAMETERS

    return any(k in name for k in PEFT_PARAMETERS)


def _randomise(parts, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in parts.values():
            for n, p in module.named_parameters():
                if _adapter(n):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


P = Parameters(lora_unet_rank=4, lora_unet_alpha=2.0, lora_text_encoder_rank=2, lora_text_encoder_alpha=2.0,
               lora_unet_learning_rate=3e-4, lora_text_encoder_learning_rate=7e-5, lora_layers="attention+ff+conv")
KINDS = pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])


def _p(kind: str, **changes) -> Parameters:
    return Parameters(**{**vars(P), "lora_type": kind, **changes})


@KINDS
def test_only_the_adapters_train_at_their_own_rates_and_start_as_a_no_op(kind):
    from dreambooth.lora.training import add_adapters
    from dreambooth.train.optim import param_groups

    lora = _p(kind, use_lora=True)

    unet, te = _modules()
    before = _run(unet, te)
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True)
    assert list(parts) == ["unet", "text_encoder"]
    assert torch.equal(_run(unet, te), before)  # fresh adapters (one factor 0) change nothing
    trainable = {n for m in (unet, te) for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in {"lora": [".lora_"], "loha": [".hada_w"], "lokr": [".lokr_w"],
                                                  "dora": [".lora_", ".dora_scale"]}[kind]) for n in trainable)
    assert (kind == "dora") == any(n.endswith(".dora_scale") for n in trainable)  # DoRA's magnitudes train too
    groups = param_groups(lora, unet, [te])
    assert [g["lr"] for g in groups] == [3e-4, 7e-5]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])

    unet2, te2 = _modules()
    parts2 = add_adapters(unet2, (te2,), _p(kind), train_text_encoders=False)
    assert list(parts2) == ["unet"] and not any(p.requires_grad for p in te2.parameters())
    assert len(param_groups(lora, unet2, [te2])) == 1


def test_dora_leaves_the_attention_of_an_openclip_text_encoder_plain():
    """The webui applies an OpenCLIP encoder's attention as one fused layer, which cannot take a magnitude."""
    from dreambooth.lora.training import add_adapters

    for family, plain in (("v1", False), ("v2", True)):
        unet, te = _modules()
        add_adapters(unet, (te,), _p("dora"), train_text_encoders=True, family_name=family)
        magnitudes = {n.rsplit(".", 1)[0] for n, _ in te.named_parameters() if n.endswith(".dora_scale")}
        assert any(".mlp.fc1" in n for n in magnitudes) and any(n.endswith(".dora_scale")
                                                                 for n, _ in unet.named_parameters())
        assert any(".self_attn." in n for n in magnitudes) != plain


@KINDS
def test_frozen_weights_are_kept_in_the_training_precision(kind):
    from dreambooth.lora.training import add_adapters

    unet, te = _modules()
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True, weight_dtype=torch.bfloat16)
    for module in parts.values():
        for n, p in module.named_parameters():
            assert p.dtype == (torch.float32 if _adapter(n) else torch.bfloat16), n


@KINDS
def test_adapters_are_saved_and_resumed_exactly(tmp_path, kind):
    from dreambooth.lora.training import add_adapters, load_adapters, save_adapters

    unet, te = _modules()
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True)
    _randomise(parts)
    expected = _run(unet, te)
    save_adapters(tmp_path / "state", parts)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lora_text_encoder.safetensors",
                                                                       "lora_unet.safetensors"]
    unet2, te2 = _modules()
    parts2 = add_adapters(unet2, (te2,), _p(kind), train_text_encoders=True)
    load_adapters(tmp_path / "state", parts2)
    assert torch.equal(_run(unet2, te2), expected)

    for other in (_p(kind, lora_unet_rank=2), _p("loha" if kind == "lora" else "lora")):
        unet3, te3 = _modules()
        with pytest.raises(UserError, match="saved LoRA adapters of the unet do not fit the current settings"):
            load_adapters(tmp_path / "state", add_adapters(unet3, (te3,), other, train_text_encoders=True))


@KINDS
def test_preview_weight_scales_the_adapters_and_is_undone(kind):
    from dreambooth.lora.training import adapter_weight, add_adapters

    unet, te = _modules()
    base = _run(unet, te)
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True)
    _randomise(parts)
    full = _run(unet, te)
    with adapter_weight(parts, 0.0):
        assert torch.allclose(_run(unet, te), base, atol=1e-6)
    with adapter_weight(parts, 0.5):
        half = _run(unet, te)
    assert float((half - base).norm()) < float((full - base).norm())
    assert torch.equal(_run(unet, te), full)


@KINDS
def test_merged_weights_give_the_adapted_model(kind):
    from dreambooth.lora.training import add_adapters, merged_state_dicts

    unet, te = _modules()
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True)
    _randomise(parts)
    expected = _run(unet, te)
    merged = merged_state_dicts(parts)
    unet2, te2 = _modules()
    unet2.load_state_dict(merged["unet"])
    te2.load_state_dict(merged["text_encoder"], strict=False)  # CLIP's position_ids buffer varies by version
    assert torch.allclose(_run(unet2, te2), expected, atol=1e-5)


@KINDS
def test_every_adapter_gets_a_gradient_with_gradient_checkpointing(kind):
    """transformers 4.30 checkpoints re-entrantly: without care the text encoder's adapters would get no gradient.
    Every trained tensor gets one (DoRA's magnitudes too)."""
    from dreambooth.lora.training import add_adapters

    unet, te = _modules()
    unet.enable_gradient_checkpointing()
    te.gradient_checkpointing_enable()
    unet.train()
    te.train()
    parts = add_adapters(unet, (te,), _p(kind), train_text_encoders=True)
    _randomise(parts)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    unet(torch.randn(1, 4, 8, 8), 10, te(ids)[0]).sample.square().mean().backward()
    for part, module in parts.items():
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), (part, [
            n for n, g in grads.items() if g is None or not g.abs().sum() > 0][:3])
