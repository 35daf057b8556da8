"""Optimizer (separate UNet and text-encoder learning rates) and learning-rate schedule from the parameters."""
from __future__ import annotations

import os

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


def check_optimizer_runs_here(params, device=None) -> None:
    """Before any model loads: can the chosen optimizer take a step on this machine? UserError naming the setting and
    the alternative if not.

    bitsandbytes' 8-bit AdamW runs on CUDA GPUs; on a CPU only from bitsandbytes 0.50 on (0.42 asserts that torch has
    CUDA, 0.45 - 0.49 ask for a GPU). One step on a small tensor on the training device tells."""
    if params.optimizer != "adamw_8bit":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError("parameters.optimizer: adamw_8bit needs bitsandbytes, which is not installed "
                        "(pip install bitsandbytes, or choose adamw)") from e
    except Exception as e:  # a broken install failing while it loads its library
        raise UserError(f"parameters.optimizer: adamw_8bit needs bitsandbytes, which fails to load "
                        f"({type(e).__name__}); choose adamw") from e
    if device is None:  # this process's GPU under `accelerate launch` (LOCAL_RANK), else the CPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        trial = torch.nn.Parameter(torch.zeros(4096, device=device))  # 4096: bitsandbytes' smallest 8-bit tensor
        trial.grad = torch.ones_like(trial)
        bnb.optim.AdamW8bit([trial], lr=1e-3).step()
        stepped = bool(torch.isfinite(trial.detach()).all()) and float(trial.detach()[0]) < 0
        problem = None if stepped else "its step did not change the weights"
    except Exception as e:  # AssertionError, RuntimeError, NameError ... from bitsandbytes' device checks
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
    if problem:
        where = "a CPU (bitsandbytes 0.50 or newer runs it there)" if device.type == "cpu" else f"{device}"
        raise UserError(f"parameters.optimizer: adamw_8bit cannot run on {where} with the installed bitsandbytes "
                        f"{getattr(bnb, '__version__', '?')} ({problem}); choose adamw (more memory) or adafactor")


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
