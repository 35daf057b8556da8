"""LoRA in the trainer: adapters on the loaded model, what trains and at which rate, saving and resuming the
adapters, the weight they are previewed at, and the exports (the LoRA file; optionally the merged checkpoint).

The model's own weights never change: they are frozen (and kept in the training precision, which is where the
memory saving comes from); only the adapters train, in float32. The working model on disk stays the base.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..errors import UserError
from .weights import (ADAPTER, PEFT_PARAMETERS, adapter_layers, adapters_of, attach_adapters, layer_factors,
                      layer_kind, lora_parameters)

TEXT_PARTS = ("text_encoder", "text_encoder_2")


def add_adapters(unet, text_encoders, params, train_text_encoders: bool, weight_dtype=torch.float32,
                 family_name: str = "v1") -> dict:
    """Freeze the model, put adapters on the UNet (and the text encoders when they train); {part: module}."""
    from ..families import family

    parts = {"unet": unet}
    if train_text_encoders:
        parts.update(zip(TEXT_PARTS, text_encoders))
    for module in (unet, *text_encoders):
        module.requires_grad_(False)
        module.to(weight_dtype)
    for part, module in parts.items():
        which = "unet" if part == "unet" else "text_encoder"
        rank, alpha = getattr(params, f"lora_{which}_rank"), getattr(params, f"lora_{which}_alpha")
        setting = f"lora_{which}_rank"
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same adapters, whatever ran before
            torch.manual_seed(params.seed + len(part))
            attach_adapters(module, part, rank, alpha, params.lora_layers, params.lora_dropout, setting=setting,
                            kind=params.lora_type, fused_attention=family(family_name).is_openclip(part))
        for p in lora_parameters(module):
            p.data = p.data.float()
            p.requires_grad_(True)
        if part != "unet" and getattr(module, "is_gradient_checkpointing", False):
            # Older transformers checkpoint re-entrantly: a layer whose input needs no gradient (the frozen
            # embeddings' output) would pass none back to its adapters. Make that input ask for one.
            module.enable_input_require_grads()
    return parts


def save_adapters(folder: Path, parts: dict) -> None:
    """The adapters of every part into `folder` (one safetensors file per part: `MODULE.FACTOR` as named in the model
    and the LoRA file, and `MODULE.alpha`)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for part, module in parts.items():
        tensors = {}
        for name, layer in adapter_layers(module).items():
            for factor, p in layer_factors(layer).items():
                tensors[f"{name}.{factor}"] = p.detach().to("cpu", copy=True).contiguous()
        for name, adapter in adapters_of(module).items():
            tensors[f"{name}.alpha"] = torch.tensor(adapter.alpha)
        save_file(tensors, str(folder / f"lora_{part}.safetensors"), metadata={"format": "pt"})


def load_adapters(folder: Path, parts: dict) -> None:
    """Put saved adapter weights back into the adapters of `parts`; a UserError when they do not fit."""
    from safetensors.torch import load_file

    for part, module in parts.items():
        path = Path(folder) / f"lora_{part}.safetensors"
        saved = {k: v for k, v in (load_file(str(path)) if path.is_file() else {}).items() if not k.endswith(".alpha")}
        wanted = {f"{name}.{factor}": p for name, layer in adapter_layers(module).items()
                  for factor, p in layer_factors(layer).items()}
        if set(saved) != set(wanted) or any(saved[k].shape != p.shape for k, p in wanted.items()):
            raise UserError(f"{folder}: the saved LoRA adapters of the {part} do not fit the current settings (adapter "
                            "type, rank, layers or text-encoder training changed); put the settings back, or delete "
                            "that folder to start a new run")
        with torch.no_grad():
            for key, p in wanted.items():
                p.copy_(saved[key])


def all_layers(parts: dict) -> list:
    """The peft layers that carry the adapters, of every part."""
    return [layer for module in parts.values() for layer in adapter_layers(module).values()]


@contextlib.contextmanager
def adapter_weight(parts: dict, weight: float):
    """Apply the adapters at `weight` (as `<lora:NAME:weight>` would) inside the block."""
    layers = all_layers(parts)
    dora_layers = [layer for layer in layers if layer_kind(layer) == "dora"]  # blended, as loaders apply DoRA
    scaled = [layer for layer in layers if layer_kind(layer) != "dora"]
    before = [layer.scaling[ADAPTER] for layer in scaled]
    try:
        for layer, scale in zip(scaled, before):
            layer.scaling[ADAPTER] = scale * weight
        for layer in dora_layers:
            layer.dora_weight = weight
        yield
    finally:
        for layer, scale in zip(scaled, before):
            layer.scaling[ADAPTER] = scale
        for layer in dora_layers:
            layer.dora_weight = 1.0


def lora_weights(parts: dict) -> dict:
    """{part: {module: Adapter}} of the adapted parts, for the LoRA file."""
    return {part: adapters_of(module) for part, module in parts.items()}


def merged_state_dicts(parts: dict) -> dict:
    """{part: state dict} of the adapted parts with the adapters merged into the weights (float32, diffusers names):
    what the exporter needs to write the merged full checkpoint."""
    result = {}
    for part, module in parts.items():
        state = {k.replace(".base_layer.", "."): v.detach().float() for k, v in module.state_dict().items()
                 if not any(p in k for p in PEFT_PARAMETERS)}
        for name, adapter in adapters_of(module).items():
            state[f"{name}.weight"] = adapter.merged(state[f"{name}.weight"])
        result[part] = state
    return result


def export_lora(out: Path, parts: dict, family_name: str, unet_config: dict, params, summary: dict) -> Path:
    """Write the adapters as a kohya LoRA file (fp16 when the checkpoint setting says so)."""
    from .files import save_lora

    return save_lora(out, family_name, unet_config, lora_weights(parts), half=params.save_half,
                     resolution=params.resolution, training=summary, layers=params.lora_layers)



class LoraRun:
    """The LoRA side of a training run: the trainer calls it where a LoRA run differs from a full fine-tune.

    start()     adapters on the loaded model (from the saved state when resuming); the optimizer then sees only them
    previews()  a context in which previews show the adapters at the preview weight
    write_state(folder)  the adapters into the resume state (the model's own weights are not saved: they never change)
    export(...) the LoRA file <root>/models/Lora/NAME_<step>.safetensors, and the merged checkpoint when asked
    """

    def __init__(self, parts: dict, params, family_name: str, unet_config: dict, weight_dtype):
        self.parts, self.params, self.family, self.unet_config = parts, params, family_name, unet_config
        self.weight_dtype = weight_dtype

    @classmethod
    def start(cls, unet, text_encoders, params, family_name: str, train_text_encoders: bool,
              resume_from: Path | None = None, weight_dtype=torch.float32) -> "LoraRun | None":
        if not params.use_lora:
            return None
        parts = add_adapters(unet, text_encoders, params, train_text_encoders, weight_dtype, family_name)
        if resume_from is not None:
            load_adapters(resume_from, parts)
        return cls(parts, params, family_name, dict(unet.config), weight_dtype)

    @contextlib.contextmanager
    def previews(self):
        device = next(self.parts["unet"].parameters()).device
        autocast = (torch.autocast(device.type, dtype=self.weight_dtype) if self.weight_dtype != torch.float32
                    else contextlib.nullcontext())  # frozen half-precision weights beside a float32 VAE
        with adapter_weight(self.parts, self.params.lora_preview_weight), autocast:
            yield

    def layers(self) -> list:
        """The peft layers that carry the adapters, of every part."""
        return all_layers(self.parts)

    def write_state(self, folder: Path) -> None:
        save_adapters(folder, self.parts)

    def summary(self) -> dict:
        p = self.params
        return {"lora": {"type": p.lora_type, "unet_rank": p.lora_unet_rank, "unet_alpha": p.lora_unet_alpha,
                         "text_encoder_rank": p.lora_text_encoder_rank, "text_encoder_alpha": p.lora_text_encoder_alpha,
                         "layers": p.lora_layers, "dropout": p.lora_dropout, "parts": list(self.parts)},
                "learning_rate": p.lora_unet_learning_rate,
                "text_encoder_learning_rate": p.lora_text_encoder_learning_rate}

    def export(self, lora_out: Path, merged_out: Path | None, working: Path, summary: dict) -> list[Path]:
        """The LoRA file (and the merged full checkpoint at `merged_out`, when given); their paths."""
        from ..checkpoint.export import write_single_file

        p = self.params
        paths = [export_lora(lora_out, self.parts, self.family, self.unet_config, p, summary)]
        if merged_out is not None:
            paths.append(write_single_file(working, merged_out, fmt=p.checkpoint_format, half=p.save_half,
                                           state_dicts=merged_state_dicts(self.parts), training=summary,
                                           metadata={"dreambooth.training": json.dumps(summary)}))
        return paths
