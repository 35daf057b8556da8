"""Single file <-> working diffusers folder, one tensor at a time.

Import: read configs from the tensors (layout.py), rename every key through the table (keymap.py), check the result
against the diffusers model built on the meta device (names and shapes must match exactly, else "unknown layout"),
and stream each tensor into the component's safetensors file. Keys with no diffusers home (EMA copies, schedule
buffers, OpenCLIP's unused last layer, text_projection of v2, logit_scale, position_ids) go to
working/ldm_extras.safetensors under their original names so that export can give them back.

Export: the reverse, plus the extras; tensors the original releases carry but a diffusers folder cannot hold are
filled in (see `_fillers`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..families import MODEL_INFO_FILE, detect_keys, family, family_from_keys
from . import keymap
from .keymap import CONV1X1, QKV, TRANSPOSE
from .layout import YAML_PROBLEM, text_config, unet_config, vae_config
from .tensorio import DictSource, Entry, RenamedSource, SafetensorsSource, TensorSource, open_checkpoint, write_safetensors

EXTRAS_FILE = "ldm_extras.safetensors"
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
EMA_PREFIX = "model_ema."
LOGIT_SCALE = math.log(100.0)  # CLIP's trained temperature; unused by Stable Diffusion, present in the releases


def components_of(family_name: str) -> list[str]:
    return list(family(family_name).components)


def meta_model(component: str, config: dict, family_name: str) -> torch.nn.Module:
    """The diffusers / transformers module of a component, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            from diffusers import AutoencoderKL
            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))


def canonical_key(component: str, key: str) -> str:
    """transformers 5 names CLIPTextModel's tensors without the `text_model.` prefix that every on-disk CLIP
    folder uses (and transformers 4 needs); we always write and map the prefixed name."""
    if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
        return "text_model." + key
    return key


def canonical_source(component: str, tensors: dict) -> DictSource:
    return DictSource({canonical_key(component, k): v.detach() for k, v in tensors.items()})


def expected_shapes(component: str, config: dict, family_name: str) -> dict[str, tuple]:
    return {canonical_key(component, k): tuple(v.shape)
            for k, v in meta_model(component, config, family_name).state_dict().items()}


def _to_diffusers_shape(kind: str, shape: tuple) -> tuple:
    if kind == CONV1X1:
        return tuple(shape[:2])
    if kind == QKV:
        return (shape[0] // 3, *shape[1:])
    if kind == TRANSPOSE:
        return tuple(reversed(shape))
    return tuple(shape)


def _to_diffusers_tensor(kind: str, t: torch.Tensor, part: int) -> torch.Tensor:
    if kind == CONV1X1:
        return t.reshape(t.shape[:2])
    if kind == QKV:
        return t.chunk(3, dim=0)[part]
    if kind == TRANSPOSE:
        return t.t()
    return t


def configs_from_single_file(source: TensorSource, family_name: str, yaml_data: dict | None) -> dict[str, dict]:
    prefixes = family(family_name).components
    configs = {}
    for component in ("text_encoder", "text_encoder_2"):
        if component in prefixes:
            openclip = family(family_name).is_openclip(component)
            configs[component] = text_config(source, prefixes[component], openclip,
                                             drop_last_layer=openclip and component == "text_encoder")
    pooled = configs["text_encoder_2"]["projection_dim"] if "text_encoder_2" in configs else None
    configs["unet"] = unet_config(source, prefixes["unet"], family_name, yaml_data, pooled)
    configs["vae"] = vae_config(source, prefixes["vae"], family_name, yaml_data)
    return configs


def plan_import(source: TensorSource, family_name: str, configs: dict[str, dict]):
    """({component: [Entry in diffusers names]}, [Entry of extras in single-file names]); UserError on a bad layout."""
    prefixes = family(family_name).components
    plans: dict[str, list[Entry]] = {}
    used: set[str] = set()
    for component, prefix in prefixes.items():
        expected = expected_shapes(component, configs[component], family_name)
        cmap = keymap.component_map(component, configs[component], family(family_name).is_openclip(component))
        entries = []
        for key in source.keys():
            if not key.startswith(prefix):
                continue
            targets = cmap.to_diffusers(key[len(prefix):])
            if not targets or any(name not in expected for name, _ in targets):
                continue  # no diffusers home: kept as an extra
            for part, (name, kind) in enumerate(targets):
                shape = _to_diffusers_shape(kind, source.shape(key))
                if shape != expected[name]:
                    raise UserError(f"unknown checkpoint layout: {key} has shape {list(source.shape(key))}, "
                                    f"which does not fit {component} {name} {list(expected[name])}")
                make = (lambda k=key, kd=kind, p=part: _to_diffusers_tensor(kd, source.get(k), p))
                entries.append(Entry(name, shape, source.dtype(key), make))
            if not key.endswith("position_ids"):  # kept as an extra too: export writes the source's own back
                used.add(key)
        missing = sorted(set(expected) - {e.key for e in entries})
        for name in [m for m in missing if m.endswith("position_ids")]:
            # transformers < 4.31 keeps CLIP's position ids as a saved buffer; OpenCLIP files have none: rebuild it.
            entries.append(Entry(name, expected[name], torch.int64,
                                 (lambda n=expected[name][-1]: torch.arange(n).unsqueeze(0))))
            missing.remove(name)
        if missing:
            names = [prefix + (cmap.to_ldm(k) or (k,))[0] for k in missing[:3]]  # as the file would name them
            raise UserError(f"unknown checkpoint layout: the {component} lacks {len(missing)} tensors "
                            f"(e.g. {', '.join(names)})")
        plans[component] = entries
    extras = [Entry(k, source.shape(k), source.dtype(k), (lambda k=k: source.get(k)))
              for k in source.keys() if k not in used]
    return plans, extras


def write_component(folder: Path, component: str, config: dict, entries: list[Entry], family_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = meta_model(component, config, family_name)
    if component in ("unet", "vae"):
        model.save_config(str(folder))
    else:
        model.config.save_pretrained(str(folder))
        # Load in float32 by default, as diffusers loads the UNet and VAE; transformers 5 would otherwise load an
        # fp16 file as fp16 and a pipeline would mix dtypes. The file keeps the source's dtype.
        config_path = folder / "config.json"
        data = json.loads(config_path.read_text(encoding="utf-8"))
        data.update(dtype="float32", torch_dtype="float32")
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_safetensors(folder / WEIGHT_FILES[component], entries, metadata={"format": "pt"})


def write_pipeline_files(working: Path, family_name: str) -> None:
    """Tokenizers, scheduler and model_index.json: what makes the folder a standard diffusers pipeline."""
    import diffusers
    from diffusers import DDIMScheduler

    from ..families import write_tokenizer

    fam = family(family_name)
    for folder, pad in zip(fam.tokenizers, fam.pad_tokens):
        write_tokenizer(working / folder, pad_token=pad)
    DDIMScheduler(**fam.scheduler_config()).save_config(str(working / "scheduler"))
    index = {"_class_name": fam.pipeline_class_name,
             "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if fam.is_sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True,
                     feature_extractor=[None, None], image_encoder=[None, None])
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (working / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def import_single_file(path: Path, working: Path, forced: str = "auto") -> dict:
    """Write `working` (a new folder) from a single-file checkpoint; return the model info (family, notes)."""
    from .. import families

    path = Path(path)
    source = open_checkpoint(path)
    yaml_path = path.with_suffix(".yaml")
    yaml_data = None
    if yaml_path.exists():
        yaml_data = families.read_model_yaml(yaml_path)
    if family_from_keys(source.keys()) is None and any(k.startswith(EMA_PREFIX) for k in source.keys()):
        raise UserError(f"{path}: holds only EMA weights (model_ema.*, names without dots), which cannot be "
                        "mapped back; use a file with model.diffusion_model.* weights")
    detection = detect_keys(source.keys(), yaml_path if yaml_data is not None else None, forced, what=str(path))
    name, how = detection.family, detection.how
    try:
        configs = configs_from_single_file(source, name, yaml_data)
        plans, extras = plan_import(source, name, configs)
    except UserError as e:  # named after the file it is about: the checkpoint, or the yaml beside it
        about_yaml = str(e).startswith(YAML_PROBLEM)
        raise UserError(f"{yaml_path if about_yaml else path}: {str(e).removeprefix(YAML_PROBLEM)}") from e
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError, AttributeError) as e:  # missing or odd
        raise UserError(f"{path}: unknown checkpoint layout ({type(e).__name__}: {e})") from e
    working.mkdir(parents=True, exist_ok=True)
    for component, entries in plans.items():
        write_component(working / component, component, configs[component], entries, name)
    if extras:
        write_safetensors(working / EXTRAS_FILE, extras, metadata={"format": "pt"})
    write_pipeline_files(working, name)
    info = {"family": name, "detected": how, "source": str(path),
            "dtype": str(next(iter(plans["unet"])).dtype).replace("torch.", ""),
            "extras": len(extras), "yaml_beside_source": yaml_data is not None}
    (working / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    families.log.info("imported %s as %s (%s)", path, name, how)
    return info


# ---- export ----

def read_configs(working: Path, family_name: str) -> dict[str, dict]:
    return {c: json.loads((Path(working) / c / "config.json").read_text(encoding="utf-8"))
            for c in components_of(family_name)}


def component_source(folder: Path, component: str) -> TensorSource:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (the working model is incomplete)")
    source = SafetensorsSource(files)
    return RenamedSource(source, {canonical_key(component, k): k for k in source.keys()})


def plan_export(family_name: str, configs: dict[str, dict], sources: dict[str, TensorSource],
                extras: TensorSource | None, include_ema: bool, half: bool) -> list[Entry]:
    prefixes = family(family_name).components
    out: dict[str, Entry] = {}
    for component, prefix in prefixes.items():
        source = sources[component]
        cmap = keymap.component_map(component, configs[component], family(family_name).is_openclip(component))
        groups: dict[str, tuple[str, list[str]]] = {}
        for key in source.keys():
            if key.endswith("position_ids"):
                continue  # a buffer older transformers save; the extras keep the source's own
            found = cmap.to_ldm(key)
            if found is None:
                raise UserError(f"{component}: tensor {key} has no place in a single-file checkpoint")
            ldm, kind = found
            groups.setdefault(prefix + ldm, (kind, []))[1].append(key)
        for ldm, (kind, keys) in groups.items():
            out[ldm] = _export_entry(ldm, kind, keys, source, half)
    if extras is not None:
        for key in extras.keys():
            if key in out or (key.startswith(EMA_PREFIX) and not include_ema):
                continue
            out[key] = Entry(key, extras.shape(key), _out_dtype(extras.dtype(key), half), (lambda k=key: extras.get(k)))
    for entry in _fillers(family_name, configs, out, half):
        out[entry.key] = entry
    return list(out.values())


def _out_dtype(dtype: torch.dtype, half: bool) -> torch.dtype:
    return torch.float16 if half and dtype.is_floating_point else dtype


def _export_entry(ldm: str, kind: str, keys: list[str], source: TensorSource, half: bool) -> Entry:
    dtype = _out_dtype(source.dtype(keys[0]), half)
    shape = source.shape(keys[0])
    if kind == QKV:
        order = {n: i for i, n in enumerate(keymap.QKV_NAMES)}
        keys = sorted(keys, key=lambda k: order[k.split(".")[-2]])
        if len(keys) != 3:
            raise UserError(f"{ldm}: needs q, k and v projections, found {keys}")
        return Entry(ldm, (shape[0] * 3, *shape[1:]), dtype, lambda: torch.cat([source.get(k) for k in keys], 0))
    key = keys[0]
    if kind == CONV1X1:
        return Entry(ldm, (*shape, 1, 1), dtype, lambda: source.get(key).reshape(*shape, 1, 1))
    if kind == TRANSPOSE:
        return Entry(ldm, tuple(reversed(shape)), dtype, lambda: source.get(key).t())
    return Entry(ldm, shape, dtype, lambda: source.get(key))


def _fillers(family_name: str, configs: dict, out: dict[str, Entry], half: bool) -> list[Entry]:
    """Tensors the original OpenCLIP files carry that a diffusers folder made elsewhere does not have.

    Stable Diffusion never uses them (v2 and SDXL condition on the penultimate layer, not on the projection or the
    last layer), but strict loaders expect them: logit_scale; for v2 also text_projection (identity) and the last
    transformer layer (a copy of the one before it).
    """
    fam = family(family_name)
    fillers = []
    for component, prefix in family(family_name).components.items():
        if not family(family_name).is_openclip(component):
            continue
        dtype = out[prefix + "ln_final.weight"].dtype
        if prefix + "logit_scale" not in out:
            fillers.append(Entry(prefix + "logit_scale", (), dtype, lambda: torch.tensor(LOGIT_SCALE)))
        if fam.is_sdxl:
            continue
        width = configs[component]["hidden_size"]
        if prefix + "text_projection" not in out:
            fillers.append(Entry(prefix + "text_projection", (width, width), dtype, lambda w=width: torch.eye(w)))
        last = configs[component]["num_hidden_layers"]
        block = f"{prefix}transformer.resblocks."
        if not any(k.startswith(f"{block}{last}.") for k in out):
            for key in [k for k in out if k.startswith(f"{block}{last - 1}.")]:
                copy = key.replace(f"{block}{last - 1}.", f"{block}{last}.", 1)
                fillers.append(Entry(copy, out[key].shape, out[key].dtype, out[key].make))
    return fillers
