"""Resume state and crash-safe folder replacement.

<model>/state/ holds the trained weights together with what they alone do not: optimizer, LR scheduler, EMA,
step and the torch RNG.
Every save writes a complete new folder beside the old one and swaps it in with renames, so a kill or a full disk
during a save leaves the previous state (and weights) usable; `recover_folder` finishes an interrupted swap.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError


def _new(final: Path) -> Path:
    return final.parent / f".{final.name}.new"


def _old(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def recover_folder(final: Path) -> None:
    """After a kill mid-swap: put the previous folder back if the new one never arrived; drop leftovers."""
    final = Path(final)
    if not final.exists() and _old(final).exists():
        _old(final).rename(final)
    for leftover in (_new(final), _old(final)):
        if leftover.exists():
            shutil.rmtree(leftover)


def swap_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Write a complete new folder with `write(tmp)`, then replace `final` by it (the old one goes last)."""
    final = Path(final)
    recover_folder(final)
    tmp = _new(final)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rename(_old(final))
    tmp.rename(final)
    shutil.rmtree(_old(final), ignore_errors=True)


def link_tree(source: Path, target: Path) -> None:
    """Fill `target` with hard links to the files of `source` (copies where links are not possible)."""
    for path in Path(source).rglob("*"):
        dest = Path(target) / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def save_state(folder: Path, step: int, total_steps: int, optimizer, lr_scheduler, ema,
               write_weights: Callable[[Path], None] | None = None) -> None:
    def write(tmp: Path) -> None:
        if write_weights is not None:
            write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "total_steps": total_steps}) + "\n")

    swap_folder(folder, write)


def saved_step(folder: Path) -> int | None:
    recover_folder(folder)
    try:
        return int(json.loads((Path(folder) / "trainer.json").read_text())["step"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def load_state(folder: Path, accelerator, optimizer, lr_scheduler, ema) -> int | None:
    """Restore a saved run; returns its step, or None when there is nothing to resume."""
    step = saved_step(folder)
    if step is None:
        return None
    folder = Path(folder)
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
    try:
        optimizer.load_state_dict(load("optimizer.pt"))
        lr_scheduler.load_state_dict(load("lr_scheduler.pt"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the saved training state does not fit the current settings (optimizer or text "
                        f"encoder training changed: {e}); put the settings back, or delete that folder to start a "
                        "new run from the saved weights") from None
    if ema is not None and (folder / "ema.pt").exists():
        ema.load_state_dict(load("ema.pt"))
        ema.to(accelerator.device)
    rng = load("rng.pt")
    if accelerator.is_main_process:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return step
