"""A LoRA as one .safetensors file: kohya keys, kohya and modelspec metadata, and the hashes the webui shows.

Metadata the hosts read:
- `ss_base_model_version` (`sd_v1`, `sd_v2`, `sd_v2_v`, `sdxl_base_v1-0`) and `ss_v2` ("True" / "False"): the webui
  tells SD1 / SD2 / SDXL LoRAs apart by these and hides the ones that do not fit the loaded model;
- `ss_output_name`: the webui's default name for the prompt tag (`<lora:NAME:1>`), so it is the file's own name;
- `sshs_model_hash`: the webui's LoRA hash (sha256 of everything after the safetensors header), read from the
  metadata instead of hashing the file; `sshs_legacy_hash`: the old additional-networks hash (8 hex digits of the
  sha256 of the 64 KiB at 1 MiB of the file as it would be written with only its `ss_*` metadata);
- `ss_network_module` `networks.lora` for LoRA, `lycoris.kohya` with `"algo"` in `ss_network_args` for LoHa / LoKr
  and DoRA (`"algo": "lora", "dora_wd": "True"`): the loaders tell the kinds apart by the tensor names; trainers and
  model sites read these.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..families import family
from ..store import atomic_path
from .keys import KohyaNames
from .weights import Adapter, LoraWeights

NETWORK_MODULE = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya", "dora": "lycoris.kohya"}
BASE_MODEL_VERSION = {"v1": "sd_v1", "v2": "sd_v2", "v2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
LEGACY_HASH_AT, LEGACY_HASH_SIZE = 0x100000, 0x10000


def kohya_state_dict(weights: LoraWeights, names: KohyaNames, half: bool = False) -> dict[str, torch.Tensor]:
    """{kohya key: tensor}: each adapter's tensors (lora_down / lora_up, or LyCORIS' hada_* / lokr_*) in the file's
    dtype, alpha as a float32 scalar."""
    dtype = torch.float16 if half else torch.float32
    tensors = {}
    for part, adapters in weights.items():
        for module_name, adapter in adapters.items():
            name = names(part, module_name)
            if f"{name}.alpha" in tensors:
                raise ValueError(f"two modules map to the LoRA name {name}")
            for factor, tensor in adapter.tensors().items():
                tensors[f"{name}.{factor}"] = tensor.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(adapter.alpha), dtype=torch.float32)
    if not tensors:
        raise UserError("the LoRA has no adapters to write")
    return tensors


def addnet_hash_safetensors(f) -> str:
    """sha256 of a safetensors file's tensor data (everything after the 8-byte length and the JSON header)."""
    f.seek(0)
    header_size = int.from_bytes(f.read(8), "little")
    f.seek(8 + header_size)
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(f) -> str:
    f.seek(LEGACY_HASH_AT)
    return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def lora_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash, computed on the file as written with only the `ss_*` metadata (the
    tensor data, and so the model hash, do not depend on the metadata)."""
    from safetensors.torch import save

    data = io.BytesIO(save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")}))
    return {"sshs_model_hash": addnet_hash_safetensors(data), "sshs_legacy_hash": addnet_hash_legacy(data)}


def _ranks(adapters: dict[str, Adapter]) -> tuple[int, float] | None:
    if not adapters:
        return None
    ranks = sorted({a.rank for a in adapters.values()})
    alphas = sorted({a.alpha for a in adapters.values()})
    return ranks[-1], alphas[-1]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_metadata(family_name: str, title: str, weights: LoraWeights, resolution: int | None = None,
                  training: dict | None = None, layers: str = "", extra: dict | None = None) -> dict[str, str]:
    """kohya (`ss_*`) and modelspec metadata of a LoRA file (all values are strings, as safetensors requires)."""
    from ..checkpoint.export import modelspec

    fam = family(family_name)
    resolution = resolution or fam.resolution
    training = dict(training or {})
    unet = _ranks(weights.get("unet", {}))
    text = _ranks({k: a for part, adapters in weights.items() if part != "unet" for k, a in adapters.items()})
    dim, alpha = unet or text
    kinds = {a.kind for adapters in weights.values() for a in adapters.values()}
    if kinds == {"dora", "lora"}:
        kinds = {"dora"}  # a DoRA file's fused OpenCLIP attention layers are plain LoRA (weights.py)
    if len(kinds) != 1:
        raise UserError(f"a LoRA file holds one kind of adapter, not {', '.join(sorted(kinds)) or 'none'}")
    kind = kinds.pop()
    meta = modelspec(family_name, title, training or None)
    meta.update({
        "modelspec.architecture": f"{fam.architecture}/lora",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "ss_base_model_version": BASE_MODEL_VERSION[fam.name],
        "ss_v2": str(fam.name in ("v2", "v2-v")),
        "ss_v_parameterization": str(fam.prediction_type == "v_prediction"),
        "ss_network_module": NETWORK_MODULE[kind],
        "ss_network_dim": str(dim),
        "ss_network_alpha": _number(alpha),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_output_name": title,
        "ss_steps": str(int(training.get("step", 0))),
        "ss_epoch": str(int(training.get("epoch", 0))),
    })
    # LyCORIS names its network type here; its DoRA is a LoRA with weight decomposition
    args = {"lora": {}, "dora": {"algo": "lora", "dora_wd": "True"}}.get(kind, {"algo": kind})
    if layers:
        args["layers"] = layers
        if layers != "attention" and unet:
            args.update(conv_dim=str(unet[0]), conv_alpha=_number(unet[1]))
    if text:
        args.update(text_encoder_dim=str(text[0]), text_encoder_alpha=_number(text[1]))
    if args:
        meta["ss_network_args"] = json.dumps(args, sort_keys=True)
    meta["ss_training_finished_at"] = str(int(_dt.datetime.now(_dt.timezone.utc).timestamp()))
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def write_lora_file(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write the LoRA file with its hashes added to the metadata."""
    from safetensors.torch import save_file

    from ..checkpoint.export import _readable

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: a LoRA file must be named *.safetensors")
    if out.is_dir():
        raise UserError(f"{out}: is a folder, expected a file path")
    metadata = {**metadata, **lora_hashes(tensors, metadata)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _readable(tmp)
    return out


def save_lora(out: Path, family_name: str, unet_config: dict, weights: LoraWeights, half: bool = True,
              resolution: int | None = None, training: dict | None = None, layers: str = "",
              extra: dict | None = None) -> Path:
    """Write `weights` as a kohya LoRA file at `out` (see the module doc for the metadata)."""
    tensors = kohya_state_dict(weights, KohyaNames(family_name, unet_config), half=half)
    meta = lora_metadata(family_name, Path(out).stem, weights, resolution, training, layers, extra)
    return write_lora_file(out, tensors, meta)


