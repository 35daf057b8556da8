"""A LoRA from a full fine-tune: per module, the best rank-r approximation (truncated SVD) of trained - base.

Every Linear and convolution layer that LoRA can adapt ("attention+ff+conv") is considered; layers the training
did not change are left out, so a run that never trained its text encoder gives a UNet-only LoRA. A 3x3
convolution's change (out, in, 3, 3) is factored as a (r, in, 3, 3) convolution followed by a 1x1 one (out, r, 1,
1), as kohya's LoRA stores it. The rank is capped per layer at the layer's own width (min(outputs, inputs x kernel
area)): at that rank the layer's change is reproduced exactly. Each module's alpha is its rank (scale 1).

The quality of the approximation is reported per part as the relative error ||dW - dW_r|| / ||dW|| over all of
the part's layers (Frobenius norms): 0 is exact.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.tensorio import TensorSource
from ..errors import UserError
from .keys import is_target
from .weights import Adapter, LoraWeights

log = logging.getLogger("dreambooth")
EXTRACT_LAYERS = "attention+ff+conv"


@dataclass
class Extraction:
    weights: LoraWeights
    errors: dict = field(default_factory=dict)  # part -> relative error of the reconstructed change (0 = exact)
    ranks: dict = field(default_factory=dict)  # part -> the rank asked for
    unchanged: list = field(default_factory=list)  # parts the training did not change

    def report(self) -> str:
        lines = []
        for part, error in self.errors.items():
            count = len(self.weights.get(part, {}))
            lines.append(f"{part}: rank {self.ranks[part]}, {count} layers, relative error {error:.4f}")
        lines += [f"{part}: unchanged by training, left out" for part in self.unchanged]
        return "\n".join(lines)


def low_rank(delta: torch.Tensor, rank: int) -> Adapter:
    """The best rank-`rank` adapter for a weight change (Linear (out, in) or convolution (out, in, kh, kw))."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()  # split the singular values evenly: both factors stay in fp16's range
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return Adapter(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def _targets(part: str, source) -> list[str]:
    """Weight keys of the layers LoRA can adapt, in the source's order."""
    return [k for k in source.keys()
            if k.endswith(".weight") and len(source.shape(k)) in (2, 4) and is_target(part, k[:-7], EXTRACT_LAYERS)]


def check_extraction_rank(setting: str, rank, widest: int) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"{setting}: must be a whole number of at least 1, got {rank!r}")
    if rank > widest:
        raise UserError(f"{setting}: {rank} is above the width of the widest layer ({widest}); "
                        f"at {widest} every layer's change is already reproduced exactly")
    return rank


def extract_lora(trained: dict, base: dict, rank: int, te_rank: int | None = None) -> Extraction:
    """Extract a LoRA from `trained` vs `base` ({part: TensorSource with diffusers names}).

    `rank` is for the UNet, `te_rank` (default: `rank`) for the text encoder(s).
    """
    result = Extraction(weights={})
    targets = {part: _targets(part, source) for part, source in trained.items()}

    def widest(text: bool) -> int:
        return max([min(trained[p].shape(k)[0], math.prod(trained[p].shape(k)[1:]))
                    for p in trained if (p != "unet") == text for k in targets[p]], default=0)

    check_extraction_rank("--rank", rank, widest(False) or rank)
    if te_rank is None:  # not given: the UNet's rank, as far as the text encoders are wide
        te_rank = min(rank, widest(True) or rank)
    else:
        check_extraction_rank("--te-rank", te_rank, widest(True) or te_rank)
    settings = {part: rank if part == "unet" else te_rank for part in trained}
    for part, source in trained.items():
        keys, wanted = targets[part], settings[part]
        if not keys:
            continue
        if part not in base:
            raise UserError(f"the base checkpoint has no {part}")
        adapters, lost, total = {}, 0.0, 0.0
        for key in keys:
            if key not in base[part] or tuple(base[part].shape(key)) != tuple(source.shape(key)):
                raise UserError(f"the base checkpoint does not fit this model: its {part} has no {key} of shape "
                                f"{list(source.shape(key))} (was the source file replaced?)")
            delta = source.get(key).float() - base[part].get(key).float()
            change = float(delta.pow(2).sum())
            if change == 0.0:
                continue
            adapter = low_rank(delta, wanted)
            lost += float((delta - adapter.delta()).pow(2).sum())
            total += change
            adapters[key[:-7]] = adapter
        if adapters:
            result.weights[part] = adapters
            result.errors[part] = math.sqrt(lost / total)
            result.ranks[part] = wanted
        else:
            result.unchanged.append(part)
    if not result.weights:
        raise UserError("the trained weights equal the base weights: nothing to extract (train the model first)")
    return result


class _EntrySource(TensorSource):
    """The tensors of an import plan (a single file read through the key map), by diffusers name."""

    def __init__(self, entries):
        self.entries = {e.key: e for e in entries}

    def keys(self):
        return list(self.entries)

    def __contains__(self, key):
        return key in self.entries

    def shape(self, key):
        return tuple(self.entries[key].shape)

    def dtype(self, key):
        return self.entries[key].dtype

    def get(self, key):
        return self.entries[key].make()


def base_sources(source: str, family_name: str, configs: dict) -> dict:
    """{part: tensors} of the checkpoint a model was created from, by diffusers name; a UserError when it is gone."""
    from ..checkpoint.convert import component_source, plan_import
    from ..checkpoint.tensorio import open_checkpoint

    path = Path(source).expanduser() if source else None
    if path is None or not path.exists():
        raise UserError(f"the model's base checkpoint {source!r} is gone (moved or deleted); LoRA extraction needs "
                        "the weights the model was created from: put the file back at that path")
    parts = [p for p in configs if p != "vae"]
    if path.is_dir():
        return {part: component_source(path / part, part) for part in parts}
    try:
        plans, _ = plan_import(open_checkpoint(path), family_name, configs)
    except UserError as e:
        raise UserError(f"the model's base checkpoint {path} does not fit it any more ({e})") from None
    return {part: _EntrySource(plans[part]) for part in parts}


def extract_model_lora(root, name: str, rank: int, te_rank: int | None = None, out: Path | None = None,
                       half: bool = True, overwrite: bool = False) -> tuple[Path, Extraction]:
    """Extract a LoRA from the DreamBooth model `name` (trained working weights vs its source checkpoint)."""
    from ..checkpoint.convert import component_source, read_configs
    from ..families import family_from_folder
    from ..models import load_config, read_training_summary
    from .. import outputs
    from .files import save_lora

    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found under {root.dreambooth}")
    with model.lock("extracting a LoRA"):
        if not (model.working / "model_index.json").is_file():
            raise UserError(f"model {name!r}: its working model is missing (re-create the model)")
        config = load_config(model)
        family_name = family_from_folder(model.working)
        configs = read_configs(model.working, family_name)
        parts = [p for p in configs if p != "vae"]
        trained = {part: component_source(model.working / part, part) for part in parts}
        base = base_sources(config.model.source, family_name, configs)
        extraction = extract_lora(trained, base, rank, te_rank)
        training = read_training_summary(model) or {"step": 0, "epoch": 0}
    suffix = f"_extract_r{rank}" + (f"_te{te_rank}" if te_rank is not None and te_rank != rank else "")
    if out:
        out = outputs.chosen(model, Path(out).expanduser(), overwrite, with_yaml=False)
    else:
        out = outputs.automatic(model, outputs.lora_file(root.lora, name, training.get("step", 0), suffix),
                                with_yaml=False)
    extra = {"dreambooth.extraction": {"ranks": extraction.ranks, "relative_error": extraction.errors,
                                       "unchanged": extraction.unchanged, "base": str(config.model.source)}}
    path = save_lora(out, family_name, configs["unet"], extraction.weights, half=half,
                     resolution=config.parameters.resolution, training=training, layers=EXTRACT_LAYERS, extra=extra)
    outputs.record(model, path)
    log.info("extracted %s\n%s", path, extraction.report())
    return path, extraction
