"""Helpers for the LoRA tests: pipelines with random peft adapters, a fixed UNet input, peft's own merged weights."""
from __future__ import annotations

from pathlib import Path

import torch


def parts_of(pipe, family: str) -> dict:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if family == "sdxl":
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


def read_lora(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_pipeline(working: Path, family: str):
    from dreambooth.families import pipeline_class

    return pipeline_class(family).from_pretrained(str(working), torch_dtype=torch.float32)


def add_random_adapters(pipe, family: str, layers: str, unet=(4, 8.0), text=(2, 1.0), seed: int = 0,
                        kind: str = "lora") -> dict:
    """Our peft adapters of `kind` on every part, with random (non-zero) weights, as trained ones would have."""
    from dreambooth.families import family as family_facts
    from dreambooth.lora.weights import PEFT_PARAMETERS, attach_adapters

    parts = parts_of(pipe, family)
    generator = torch.Generator().manual_seed(seed)
    for part, module in parts.items():
        rank, alpha = unet if part == "unet" else text
        attach_adapters(module, part, rank, alpha, layers, kind=kind,
                        fused_attention=family_facts(family).is_openclip(part))
        for name, p in module.named_parameters():
            if any(k in name for k in PEFT_PARAMETERS):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return parts


def unet_output(pipe, family: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet prediction, text conditioning) for a fixed latent, timestep and prompt."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer(["a photo of zwx dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        if family == "sdxl":
            ids2 = pipe.tokenizer_2(["a photo of zwx dog"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
            first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = pipe.text_encoder_2(ids2, output_hidden_states=True)
            context = torch.cat([first, second.hidden_states[-2]], dim=-1)
            added = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            return pipe.unet(sample, 500, context, added_cond_kwargs=added).sample, context
        context = pipe.text_encoder(ids)[0]
        return pipe.unet(sample, 500, context).sample, context


def peft_merged_state_dict(module: torch.nn.Module) -> dict:
    """The module's weights with peft's own delta (get_delta_weight) added: what merging the adapters gives."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dreambooth.lora.weights import PEFT_PARAMETERS

    state = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in module.state_dict().items()
             if not any(p in k for p in PEFT_PARAMETERS)}
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            state[f"{name}.weight"] += layer.get_delta_weight("default").detach()
    return state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
