"""Resume state (the torch part of a save) and what a failed write means.

<model>/state/ holds the trained weights together with what they alone do not: optimizer, LR scheduler, EMA,
step and the torch RNG; trainer.json says which step and whether that save's checkpoint file was written.
Each save is a complete new folder swapped in with renames (saves.py), so a kill or a full disk during a save
leaves the previous state (and weights) usable; `remove_leftovers` drops the temporary files of a killed save. A
damaged state file is an error naming it, never a silent restart from step 0.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from ..errors import UserError, causes
from .saves import TRAINER_FILE, damaged, saved_step, swap_folder

log = logging.getLogger("dreambooth")


def _save_torch(obj, path: Path) -> None:
    # Through a file object: a failed write then surfaces as the OSError it is (with a path, torch reports only
    # "enforce fail at inline_container.cc").
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_state(folder: Path, step: int, total_steps: int, optimizer, lr_scheduler, ema,
               write_weights: Callable[[Path], None] | None = None, device=None) -> None:
    def write(tmp: Path) -> None:
        if write_weights is not None:
            write_weights(tmp)
        _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        _save_torch(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if ema is not None:
            _save_torch(ema.state_dict(), tmp / "ema.pt")
        rng = {"torch": torch.get_rng_state()}
        if device is not None and torch.device(device).type == "cuda":  # the training GPU's own generator
            rng["cuda"] = torch.cuda.get_rng_state(torch.device(device))
        _save_torch(rng, tmp / "rng.pt")
        info = {"step": step, "total_steps": total_steps, "checkpoint_written": False, "saved_at": time.time()}
        (tmp / TRAINER_FILE).write_text(json.dumps(info) + "\n")

    swap_folder(folder, write)


def _load(path: Path):
    if not path.is_file():
        raise damaged(path, "the file is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or overwritten: torch says so in many ways (zip, pickle, EOF)
        raise damaged(path, f"cannot be read: {type(e).__name__}") from e


def load_optimizer_state(optimizer, saved: dict) -> None:
    """The optimizer's saved state, each tensor in the dtype it was saved in.

    torch casts the state to its parameter's dtype when loading; weights held in bf16 (pure bf16) keep an fp32 state
    (the update runs in fp32), which must come back as fp32, not rounded to bf16."""
    optimizer.load_state_dict(saved)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        live = optimizer.state[params[index]]
        for key, value in values.items():
            if torch.is_tensor(value) and torch.is_tensor(live.get(key)) and value.dtype != live[key].dtype:
                live[key] = value.to(live[key].device)


def load_state(folder: Path, accelerator, optimizer, lr_scheduler, ema) -> int | None:
    """Restore a saved run; returns its step, or None when there is nothing to resume."""
    step = saved_step(folder)
    if step is None:
        return None
    folder = Path(folder)
    optimizer_state, scheduler_state = _load(folder / "optimizer.pt"), _load(folder / "lr_scheduler.pt")
    try:
        load_optimizer_state(optimizer, optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        # The saved rates follow the saved run's total steps: a run with another total (--max-steps, more epochs)
        # goes on along its own schedule from the saved step.
        for group, rate, base in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, lr_scheduler.base_lrs):
            group["lr"] = base * rate(lr_scheduler.last_epoch)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the saved training state does not fit the current settings (optimizer or text "
                        f"encoder training changed: {e}); put the settings back, or delete that folder to start a "
                        "new run from the saved weights") from e
    if ema is not None and (folder / "ema.pt").exists():
        try:
            ema.load_state_dict(_load(folder / "ema.pt"))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise damaged(folder / "ema.pt", f"not an EMA state: {e}") from e
        ema.to(accelerator.device)
    rng = _load(folder / "rng.pt")
    try:
        if accelerator.is_main_process:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and accelerator.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
    except (TypeError, KeyError, RuntimeError) as e:
        raise damaged(folder / "rng.pt", "not a random generator state") from e
    return step


# -- what a failed write means ----------------------------------------------------------------------------------

def write_failed(error: BaseException) -> bool:
    """Whether an exception raised while writing files is the write failing (not a bug in the writer)."""
    return any(isinstance(e, (OSError, SafetensorError)) for e in causes(error)) or (
        isinstance(error, RuntimeError) and "inline_container" in str(error))
