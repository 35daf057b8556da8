"""Where the tab runs: standalone, or inside the Stable Diffusion WebUI.

The actions, the jobs and the UI only talk to a Host. The webui adapter (scripts/dreambooth_tab.py) builds one whose
hooks call the webui's own functions, so nothing in dreambooth/ imports the webui. Standalone, the hooks do nothing
and the checkpoint list is the data root's models/Stable-diffusion folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .access import Access
from .store import DataRoot

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def _nothing() -> None:
    return None


def checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files under a folder (recursively), sorted by path."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class Host:
    """What the tab needs from its surroundings.

    checkpoints() -> {title: path} of the checkpoints a model can be created from;
    before_training() frees the host's loaded model (VRAM) before a training starts;
    after_training() loads it again when the training has ended;
    checkpoints_changed() refreshes the host's checkpoint list after a checkpoint file was written;
    loras_changed() refreshes its LoRA list after a LoRA file was written;
    access: who may call the tab's handlers and the REST routes (dreambooth.access);
    parameter_defaults() -> {parameter: value} of the host's settings that fill a model's empty parameters.
    """

    root: DataRoot
    name: str = "standalone"
    list_checkpoints: Callable[[], dict] | None = None
    before_training: Callable[[], None] = _nothing
    after_training: Callable[[], None] = _nothing
    checkpoints_changed: Callable[[], None] = _nothing
    loras_changed: Callable[[], None] = _nothing
    access: Access = field(default_factory=Access)
    parameter_defaults: Callable[[], dict] = dict

    def run_settings(self, parameters) -> dict:
        """The host's settings that stand in for the model's empty parameters of the same name in a training run
        (read at each start, so a change applies to the next run)."""
        return {k: v for k, v in self.parameter_defaults().items() if v and not getattr(parameters, k)}

    def files_changed(self, paths) -> None:
        """Refresh the host's lists that the written files belong to."""
        paths = [Path(p).resolve() for p in paths]
        lora = self.root.lora.resolve()
        if any(p.parent == lora for p in paths):
            self.loras_changed()
        if any(p.parent != lora for p in paths):
            self.checkpoints_changed()

    def checkpoints(self) -> dict:
        if self.list_checkpoints is not None:
            return dict(self.list_checkpoints())
        folder = self.root.checkpoints
        return {str(p.relative_to(folder)): str(p) for p in checkpoint_files(folder)}


def standalone_host(root: DataRoot, access: Access | None = None) -> Host:
    return Host(root=root, access=access or Access())
