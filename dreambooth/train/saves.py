"""Saved runs on disk without torch: crash-safe folder replacement, what a save says of itself (trainer.json), and
the earlier saves a run can go back to. The tab lists and picks saves through this module alone.

Every save writes a complete new folder beside the old one and swaps it in with renames (`swap_folder`), so a kill or
a full disk during a save leaves the previous one usable; `recover_folder` finishes an interrupted swap.
<model>/saves/step-S/ keep the last N saves' states (`keep_save`), so that a run can go back to an earlier one
(`go_back`). They are hard links to the files of state/ at that save: the newest costs nothing; an older one costs
its size once state/ has moved on.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..store import atomic_write_text, read_bytes

log = logging.getLogger("dreambooth")
TRAINER_FILE = "trainer.json"


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


def mark_checkpoint_written(folder: Path) -> None:
    """The save's checkpoint file is complete: a resumed run need not write it again."""
    info = read_trainer_info(folder)
    atomic_write_text(Path(folder) / TRAINER_FILE, json.dumps({**info, "checkpoint_written": True}) + "\n")


def damaged(path: Path, problem: str) -> UserError:
    folder = Path(path).parent
    return UserError(f"{path}: the saved training state is damaged ({problem}); put back a good copy of it, "
                     f"or start over by deleting {folder} (the next run then starts at step 0 from the last saved "
                     "weights)")


def read_trainer_info(folder: Path) -> dict | None:
    """{"step", "total_steps", "checkpoint_written", "saved_at"} of the saved run; None when nothing was saved.

    It only reads, so the tab may call it while a trainer writes: the folder's writer (holding the model's lock) is
    the one that calls `recover_folder`. Mid-swap, the previous folder is the save."""
    folder = Path(folder)
    if not folder.exists() and _old(folder).exists():
        folder = _old(folder)
    if not folder.exists():
        return None
    path = folder / TRAINER_FILE
    try:
        info = json.loads(read_bytes(path, limit=1 << 20).decode("utf-8"))
    except FileNotFoundError as e:
        raise damaged(path, "the file is missing") from e
    except (UserError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, "not readable as JSON") from e
    step = info.get("step") if isinstance(info, dict) else None
    if type(step) is not int or step < 0:
        raise damaged(path, f"no valid step count in it: {str(step)[:20]}")
    info = {"total_steps": None, "checkpoint_written": True, **info}
    number = (int, float)
    if not (info["total_steps"] is None or type(info["total_steps"]) is int) or not isinstance(
            info["checkpoint_written"], bool) or not isinstance(info.get("saved_at", 0.0), number):
        raise damaged(path, "a value of the wrong type in it")
    return info


def saved_step(folder: Path) -> int | None:
    info = read_trainer_info(folder)
    return None if info is None else info["step"]


# -- earlier saves to go back to -------------------------------------------------------------------------------

SAVE_FOLDER = re.compile(r"^step-(\d+)$")


def kept_saves(saves: Path) -> list[dict]:
    """The kept saves, newest first: [{"step", "total_steps", "saved_at", "path"}]. A damaged one is left out."""
    found = []
    if not Path(saves).is_dir():
        return found
    for folder in Path(saves).iterdir():
        if not SAVE_FOLDER.match(folder.name):
            continue
        try:
            info = read_trainer_info(folder)
        except UserError:
            continue
        if info is not None:
            found.append({**info, "saved_at": info.get("saved_at") or 0.0, "path": folder})
    return sorted(found, key=lambda save: (save["saved_at"], save["step"]), reverse=True)


def keep_save(state: Path, saves: Path, keep: int) -> None:
    """Record the save now in state/ as saves/step-S (hard links), then drop all but the `keep` newest; with keep 1
    nothing is kept besides state/ itself. A failure here (a full disk) costs only the earlier saves."""
    try:
        if Path(saves).is_dir():
            for leftover in Path(saves).glob(".step-*"):  # of a keep killed mid-swap
                recover_folder(Path(saves) / leftover.name[1:].rsplit(".", 1)[0])
        if keep > 1:
            step = saved_step(state)
            swap_folder(Path(saves) / f"step-{step}", lambda tmp: link_tree(state, tmp))
        for old in kept_saves(saves)[keep if keep > 1 else 0:]:
            shutil.rmtree(old["path"])
        if Path(saves).is_dir() and not any(Path(saves).iterdir()):
            Path(saves).rmdir()
    except OSError as e:
        log.warning("could not keep this save to go back to (%s); the run goes on", e)


def go_back(state: Path, saves: Path, step: int) -> str:
    """Make the kept save of `step` the state the next run resumes from (its checkpoint file is written again by
    that run). The saves stay as they are. Called with the model's lock held."""
    recover_folder(state)
    current = saved_step(state)
    if current == step:
        return f"the latest save is step {step} already"
    kept = kept_saves(saves)
    chosen = next((save for save in kept if save["step"] == step), None)
    if chosen is None:
        steps = ", ".join(str(save["step"]) for save in kept) or "none"
        raise UserError(f"no kept save at step {step} (kept: {steps}); 'Saves to go back to' sets how many are kept")
    source = chosen["path"]
    info = {key: value for key, value in chosen.items() if key != "path"}

    def write(tmp: Path) -> None:
        link_tree(source, tmp)
        (tmp / TRAINER_FILE).unlink()  # a link to the kept save's file: replace it, never write through it
        (tmp / TRAINER_FILE).write_text(json.dumps({**info, "checkpoint_written": False}) + "\n")

    swap_folder(state, write)
    return f"went back to the save at step {step}"


