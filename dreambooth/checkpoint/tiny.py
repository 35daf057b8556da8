"""A tiny, seeded random model of a family in its original single-file layout, with the yaml a host needs.

Real key layout and real CLIP vocabulary (49408 tokens), but small widths, so demos and tests train it on a CPU.
`full_text_encoder` keeps the real text-encoder widths, because the webui always builds the full CLIP encoder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..families import family
from .convert import canonical_source, plan_export
from .export import modelspec, write_entries
from .layout import render_yaml

TINY_CHANNELS = [32, 64]  # multiples of 32: LDM's GroupNorm always uses 32 groups
TINY_HEAD_CHANNELS = 16


def _text_config(full: bool, openclip: bool, sdxl_second: bool) -> dict:
    if not full:
        # SDXL's two encoders differ in width (as 768 vs 1280 do): loaders tell them apart by it.
        hidden, layers, intermediate = (64, 2, 128) if sdxl_second else (32, 2, 64)
    elif sdxl_second:
        hidden, layers, intermediate = 1280, 32, 5120
    elif openclip:
        hidden, layers, intermediate = 1024, 23, 4096  # the file gets 24: the unused last layer is added on export
    else:
        hidden, layers, intermediate = 768, 12, 3072
    return {"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": 77,
            "hidden_act": "gelu" if openclip else "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": hidden if openclip else 768, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 0 if openclip else 1}


def tiny_configs(family_name: str, full_text_encoder: bool = False, unet_layers_per_block: int = 1) -> dict[str, dict]:
    fam = family(family_name)
    configs = {}
    if fam.is_sdxl:
        configs["text_encoder"] = _text_config(full_text_encoder, False, False)
        configs["text_encoder_2"] = _text_config(full_text_encoder, True, True)
        context = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
    else:
        configs["text_encoder"] = _text_config(full_text_encoder, family_name != "v1", False)
        context = configs["text_encoder"]["hidden_size"]
    attention = [not fam.is_sdxl, True]  # SDXL has no attention at its first level
    unet = {
        "sample_size": fam.resolution // 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": TINY_CHANNELS, "layers_per_block": unet_layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context,
        "attention_head_dim": ([2, 2] if family_name == "v1" else [c // TINY_HEAD_CHANNELS for c in TINY_CHANNELS]),
        "transformer_layers_per_block": [1, 2] if fam.is_sdxl else [1, 1],
        "use_linear_projection": family_name != "v1",
        "upcast_attention": family_name == "v2-v",
    }
    if fam.is_sdxl:
        time_dim = 8
        pooled = configs["text_encoder_2"]["projection_dim"]
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                    projection_class_embeddings_input_dim=pooled + 6 * time_dim)
    configs["unet"] = unet
    configs["vae"] = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": TINY_CHANNELS,
        "layers_per_block": 1, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 32, "sample_size": fam.resolution, "scaling_factor": fam.scaling_factor,
        "force_upcast": fam.is_sdxl,
    }
    return configs


def _random_state_dict(component: str, config: dict, family_name: str, seed: int) -> dict:
    """Build the component for real (default init) from a seed of its own, so components do not shift each other."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    offset = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}[component]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 10 + offset)
        if component == "unet":
            model = UNet2DConditionModel(**config)
        elif component == "vae":
            model = AutoencoderKL(**config)
        else:
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**config))
    return canonical_source(component, model.state_dict())


def write_tiny_checkpoint(family: str, out: Path, seed: int = 0, full_text_encoder: bool = False,
                          unet_layers_per_block: int = 1) -> Path:
    """Write a tiny random `family` model to `out` (.safetensors or .ckpt) and its .yaml beside it.

    `unet_layers_per_block` 2 gives the real models' UNet depth (2 res blocks a level), which some LoRA loaders assume.
    """
    from ..families import family as family_facts

    family_name = family_facts(family).name
    out = Path(out)
    fmt = {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"{out}: the output must end in .safetensors or .ckpt")
    if seed < 0:
        raise UserError(f"seed {seed}: must not be negative")
    configs = tiny_configs(family_name, full_text_encoder, unet_layers_per_block)
    sources = {c: _random_state_dict(c, cfg, family_name, seed) for c, cfg in configs.items()}
    entries = plan_export(family_name, configs, sources, extras=None, include_ema=False, half=False)
    yaml_text, _ = render_yaml(family_name, configs["unet"], configs["vae"])
    meta = modelspec(family_name, f"tiny {family_name} seed {seed}")
    return write_entries(out, entries, fmt, meta, yaml_text)

