"""Optimizer (separate UNet and text-encoder learning rates) and learning-rate schedule from the parameters."""
from __future__ import annotations

import torch

from ..errors import UserError


def param_groups(params, unet, text_encoders) -> list[dict]:
    """What trains (with LoRA: only the adapters), UNet and text encoders as separate groups with their own rates."""
    unet_lr, te_lr = ((params.lora_unet_learning_rate, params.lora_text_encoder_learning_rate) if params.use_lora
                      else (params.learning_rate, params.text_encoder_learning_rate))
    groups = [{"params": [q for q in unet.parameters() if q.requires_grad], "lr": unet_lr}]
    te = [q for m in text_encoders for q in m.parameters() if q.requires_grad]
    if te:
        groups.append({"params": te, "lr": te_lr})
    return groups


def make_optimizer(params, unet, text_encoders):
    groups = param_groups(params, unet, text_encoders)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_epsilon,
                                 weight_decay=params.weight_decay)
    if params.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("parameters.optimizer: adamw_8bit needs bitsandbytes, which is not installed "
                            "(pip install bitsandbytes, or choose adamw)") from None
        return bnb.optim.AdamW8bit(groups, betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_epsilon,
                                   weight_decay=params.weight_decay)
    if params.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (ours, per group) instead of Adafactor's own relative step size.
        return Adafactor(groups, lr=params.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=params.weight_decay)
    raise UserError(f"parameters.optimizer: unknown optimizer {params.optimizer!r}")


def make_lr_scheduler(params, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    kwargs = {"num_warmup_steps": params.lr_warmup_steps, "num_training_steps": total_steps}
    if params.lr_scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = params.lr_cycles
    if params.lr_scheduler == "polynomial":
        kwargs["power"] = params.lr_power
    if params.lr_scheduler == "constant":
        kwargs = {}
    return get_scheduler(params.lr_scheduler, optimizer, **kwargs)
