"""The adapters of a model as plain tensors, and peft adapters put on (and read back from) the model's modules.

A LoRA adapter adds (alpha / rank) x up @ down to a module's weight. For a Linear layer down is (rank, in) and up
(out, rank); for a convolution down is a convolution of the layer's kernel size (rank, in, kh, kw) and up a 1x1 one
(out, rank, 1, 1) - the layout peft trains and kohya files store.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .keys import target_modules

ADAPTER = "default"  # peft's adapter name


@dataclass
class Adapter:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The change this adapter makes to the module's weight, in the weight's shape (float32)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


# part ("unet", "text_encoder", "text_encoder_2") -> module name (diffusers / transformers) -> adapter
LoraWeights = dict


def layer_width(module: torch.nn.Module) -> int:
    """The largest rank an adapter of this layer can use: min(outputs, inputs x kernel area)."""
    weight = module.weight
    return int(min(weight.shape[0], weight[0].numel()))


def check_rank(setting: str, rank: int, model: torch.nn.Module, names: list[str]) -> None:
    """A rank of 0, or above the narrowest adapted layer's width, is a UserError naming the setting."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"{setting}: must be a whole number of at least 1, got {rank!r}")
    if not names:
        raise UserError(f"{setting}: this model has no layers to adapt")
    modules = dict(model.named_modules())
    width, name = min((layer_width(modules[n]), n) for n in names)
    if rank > width:
        raise UserError(f"{setting}: {rank} is above the width {width} of the narrowest layer it adapts ({name}); "
                        f"use at most {width}")


def attach_adapters(model: torch.nn.Module, part: str, rank: int, alpha: float, layers: str,
                    dropout: float = 0.0, setting: str = "rank") -> list[str]:
    """Put fresh peft LoRA adapters on the target layers of `model` (in place); returns the adapted module names.

    Fresh adapters change nothing (up starts at zero); only their parameters should be trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(part, model, layers)
    check_rank(setting, rank, model, names)
    if not alpha > 0:
        raise UserError(f"{setting.replace('rank', 'alpha')}: must be above 0, got {alpha!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return names


def adapters_of(model: torch.nn.Module) -> dict[str, Adapter]:
    """The peft LoRA adapters on `model`'s modules, by module name (copies on the CPU)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            rank = module.r[ADAPTER]
            found[name] = Adapter(down=module.lora_A[ADAPTER].weight.detach().to("cpu", copy=True),
                                  up=module.lora_B[ADAPTER].weight.detach().to("cpu", copy=True),
                                  alpha=float(module.scaling[ADAPTER]) * rank)
    return found


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters of `model` (what the optimizer should see)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
