"""DoRA as the webui 1.10, Forge and ComfyUI apply a LyCORIS `dora_scale`: a LoRA whose changed weight is
renormalised per input column,

    W' = (W + s x up @ down) x m / ||W + s x up @ down||_col

where ||.||_col is the norm of each input column (over the outputs and the kernel) and m, the magnitude (`dora_scale`,
shape (1, in) or (1, in, 1, 1)), trains beside up and down, starting at ||W||_col so that a fresh adapter changes
nothing (Liu et al. 2024, with the magnitude on the axis these loaders read; peft's own DoRA keeps it per output row,
which they would apply as a different model).

Renormalising input columns is scaling the layer's input, so the peft LoRA layer runs unchanged on a scaled input:

    x W'^T + b = (x * r) (W + s x up @ down)^T + b,    r = m / ||W + s x up @ down||_col

(a forward pre-hook). As in the paper, the norm is held constant in the backward pass (no weight-sized gradient). At
a preview weight w the layer gives W + w (W' - W), as the loaders apply <lora:NAME:w>: w times its output plus 1 - w
times the plain layer's.
"""
from __future__ import annotations

import torch

MAGNITUDE = "dora_scale"  # the parameter's name on the layer, and the tensor's in the file


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_col in the magnitude's shape: (1, in) for a Linear weight, (1, in, 1, 1) for a convolution's."""
    norm = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norm.reshape(1, -1, *[1] * (weight.dim() - 2))


def renormalised(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W x m / ||W||_col: the weight a layer with this magnitude applies, given its LoRA-changed weight."""
    return weight * (magnitude / column_norm(weight))


def add_magnitudes(layers) -> None:
    """Make peft LoRA layers DoRA layers: a trained magnitude each (float32, at ||W||_col) and the hooks."""
    for layer in layers:
        base = layer.get_base_layer().weight
        layer.register_parameter(MAGNITUDE, torch.nn.Parameter(column_norm(base.detach().float())))
        layer.dora_weight = 1.0
        layer.register_forward_pre_hook(_scale_input)
        layer.register_forward_hook(_blend)


def changed_weight(layer) -> torch.Tensor:
    """W + s x up @ down of a peft LoRA layer (float32)."""
    from .weights import ADAPTER

    base = layer.get_base_layer().weight
    up, down = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight
    delta = (up.flatten(1).float() @ down.flatten(1).float()) * layer.scaling[ADAPTER]
    return base.float() + delta.reshape(base.shape)


def _scale_input(layer, args):
    x, *rest = args
    with torch.no_grad():
        norm = column_norm(changed_weight(layer))
    ratio = getattr(layer, MAGNITUDE) / norm
    if layer.get_base_layer().weight.dim() == 2:
        ratio = ratio.reshape(-1)  # a Linear's input has its features last
    if layer.dora_weight != 1.0:
        layer.plain_input = x
    return (x * ratio.to(x.dtype), *rest)


def _blend(layer, args, output):
    plain = getattr(layer, "plain_input", None)
    if plain is None:
        return output
    layer.plain_input = None
    w = layer.dora_weight
    return w * output + (1.0 - w) * layer.get_base_layer()(plain)
