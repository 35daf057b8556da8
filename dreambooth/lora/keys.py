"""Which modules get adapters, and what a kohya LoRA file calls them.

The kohya format (read by the webui's built-in Lora extension, Forge, ComfyUI and diffusers' `load_lora_weights`)
names each adapted module once, with `.lora_down.weight`, `.lora_up.weight` and `.alpha` after the name, spelled
the way kohya's trainer spells it for each family, because that is what every loader is written against:
- UNet of v1 / v2: `lora_unet_` + the diffusers module name with dots as underscores, e.g.
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`. diffusers' SD pipelines read only
  these for SD1/SD2; the webui converts them to its own names (for the real SD1/SD2 layout: 2 res blocks a level).
- UNet of SDXL: `lora_unet_` + the module's name in the original single-file layout (below
  `model.diffusion_model.`), e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, taken from the
  checkpoint key map; the webui looks these up directly, diffusers' SDXL pipeline maps them with the UNet config.
- Text encoders: `lora_te_` (v1, v2) or `lora_te1_` / `lora_te2_` (SDXL) + the transformers CLIP module name with
  dots as underscores, e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`, for OpenCLIP encoders too:
  the loaders translate these to OpenCLIP's fused attention themselves.
"""
from __future__ import annotations

import re

import torch

from ..checkpoint import keymap
from ..families import family

LAYER_SETS = ("attention", "attention+ff+conv")
UNET_PREFIX = "lora_unet_"

# Module names in diffusers / transformers terms (transformers 5 drops CLIP's `text_model.` level: optional here).
_UNET_ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_MORE = re.compile(r"(\.attentions\.\d+\.(proj_in|proj_out)|\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
                        r"|\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj))$")
# All four attention projections always go together: the webui applies an OpenCLIP layer's q/k/v only when its
# out_proj has an adapter too.
_TEXT_ATTENTION = re.compile(r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_MORE = re.compile(r"(^|\.)encoder\.layers\.\d+\.mlp\.(fc1|fc2)$")


def check_layers(layers: str) -> str:
    if layers not in LAYER_SETS:
        from ..errors import UserError
        raise UserError(f"lora_layers: {layers!r} is not one of {', '.join(LAYER_SETS)}")
    return layers


def is_target(part: str, module_name: str, layers: str) -> bool:
    """Whether the module `module_name` of `part` (unet, text_encoder, text_encoder_2) gets an adapter."""
    check_layers(layers)
    if part == "unet":
        attention, more = _UNET_ATTENTION, _UNET_MORE
    else:
        attention, more = _TEXT_ATTENTION, _TEXT_MORE
    name = "." + module_name
    return bool(attention.search(name) or (layers != "attention" and more.search(name)))


def is_attention(part: str, module_name: str) -> bool:
    """Whether the module is one of an attention layer's projections."""
    return bool((_UNET_ATTENTION if part == "unet" else _TEXT_ATTENTION).search("." + module_name))


def target_modules(part: str, model: torch.nn.Module, layers: str) -> list[str]:
    """Names of the Linear / Conv2d modules of `model` that get adapters, in the model's order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and is_target(part, name, layers)]


def text_prefixes(family_name: str) -> dict[str, str]:
    if family(family_name).is_sdxl:
        return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return {"text_encoder": "lora_te_"}


def part_prefixes(family_name: str) -> dict[str, str]:
    return {"unet": UNET_PREFIX, **text_prefixes(family_name)}


def text_module_name(module_name: str) -> str:
    """The CLIP module name as every CLIP file spells it (with `text_model.`), whatever transformers loaded it."""
    if module_name.startswith(("text_model.", "text_projection")):
        return module_name
    return "text_model." + module_name


class KohyaNames:
    """diffusers module name -> kohya module name, for one family and UNet layout."""

    def __init__(self, family_name: str, unet_config: dict):
        self.prefixes = part_prefixes(family_name)
        self.unet = keymap.component_map("unet", unet_config) if family(family_name).is_sdxl else None

    def __call__(self, part: str, module_name: str) -> str:
        if part not in self.prefixes:
            raise ValueError(f"{part}: not a part of this model ({', '.join(self.prefixes)})")
        if part == "unet" and self.unet is None:
            name = module_name
        elif part == "unet":
            found = self.unet.to_ldm(module_name + ".weight")
            if found is None:
                raise ValueError(f"unet module {module_name} has no place in a single-file checkpoint")
            name = found[0][: -len(".weight")]
        else:
            name = text_module_name(module_name)
        return self.prefixes[part] + name.replace(".", "_")
