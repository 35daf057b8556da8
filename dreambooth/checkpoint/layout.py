"""Diffusers configs read from a single file's tensors, and the inference yaml written for a host.

Widths and depths come from the tensors, never from SD's real sizes, so pruned, fp16 and tiny models all import.
What shapes cannot tell (attention head counts, VAE scale) comes from the yaml beside the file when there is one,
else from the family's rule: v1 8 heads per block; v2 / SDXL 64-channel heads; CLIP text encoders 64-dim heads.
"""
from __future__ import annotations

import copy
import re

import yaml

from ..errors import UserError
from ..families import family, reference_yaml
from .tensorio import TensorSource

V1_HEADS = 8
HEAD_CHANNELS = 64
YAML_PROBLEM = "model yaml: "  # how a problem with the yaml beside a checkpoint starts (the importer names the yaml)


def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def _section(data, *keys) -> dict:
    """data[key][key]... of a model yaml where each level is a mapping; {} where a level is absent or empty; a
    UserError naming the place where something else stands."""
    for depth, key in enumerate(keys):
        data = data.get(key) if isinstance(data, dict) else None
        if data in (None, "", []):
            return {}
        if not isinstance(data, dict):
            raise UserError(f"{YAML_PROBLEM}{'.'.join(keys[:depth + 1])} should be a mapping, not {type(data).__name__}")
    return data


def _yaml_count(value, what: str) -> int:
    if type(value) is not int or value < 1:
        raise UserError(f"{YAML_PROBLEM}{what} should be a whole number of at least 1, not {str(value)[:20]}")
    return value


def _yaml_unet_params(data: dict | None) -> dict:
    if not data:
        return {}
    params = _section(data, "model", "params")
    unet = "unet_config" if params.get("unet_config") else "network_config"
    return _section(params, unet, "params")


def unet_config(source: TensorSource, prefix: str, family_name: str, yaml_data: dict | None,
                pooled_dim: int | None) -> dict:
    fam = family(family_name)
    keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
    keyset = set(keys)
    if "input_blocks.0.0.weight" not in keyset or "out.2.weight" not in keyset:
        raise UserError("unknown checkpoint layout: the UNet has no input_blocks.0.0 / out.2 convolutions")
    shape = lambda k: source.shape(prefix + k)  # noqa: E731
    inputs = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamplers = sorted(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight"))
    per_level = (downsamplers[0] - 1) if downsamplers else max(inputs)
    levels = len(downsamplers) + 1
    if per_level < 1 or max(inputs) != levels * (per_level + 1) - 1:
        raise UserError("unknown checkpoint layout: the UNet's input blocks do not form levels of equal depth")
    channels, attention, depths = [], [], []
    for i in range(levels):
        first = 1 + i * (per_level + 1)
        channels.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depth = len(_indices(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
        attention.append(depth > 0)
        depths.append(max(depth, 1))
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth == 0:
        raise UserError("unknown checkpoint layout: the UNet's middle block has no transformer")
    if attention[-1] and mid_depth != depths[-1]:
        raise UserError(f"unknown checkpoint layout: middle block depth {mid_depth} differs from the last level's {depths[-1]}")
    depths[-1] = mid_depth
    attn_key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    if attn_key is None or proj_in is None:
        raise UserError("unknown checkpoint layout: the UNet has no cross-attention transformer")

    params = _yaml_unet_params(yaml_data)
    if params.get("num_head_channels", -1) not in (-1, None):
        heads = [max(1, c // _yaml_count(params["num_head_channels"], "num_head_channels")) for c in channels]
    elif params.get("num_heads", -1) not in (-1, None):
        heads = [_yaml_count(params["num_heads"], "num_heads")] * levels
    elif family_name == "v1":
        heads = [V1_HEADS] * levels
    else:
        heads = [max(1, c // HEAD_CHANNELS) for c in channels]

    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": fam.resolution // 8,
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "out_channels": shape("out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": shape(attn_key)[1],
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths,
        "use_linear_projection": len(shape(proj_in)) == 2,
        "upcast_attention": family_name == "v2-v",
    }
    if "label_emb.0.0.weight" in keyset:  # SDXL: pooled text embedding + 6 size/crop numbers
        adm = shape("label_emb.0.0.weight")[1]
        if not pooled_dim or (adm - pooled_dim) % 6:
            raise UserError(f"unknown checkpoint layout: label_emb width {adm} does not fit a pooled text width {pooled_dim}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=adm)
    return config


def vae_config(source: TensorSource, prefix: str, family_name: str, yaml_data: dict | None) -> dict:
    fam = family(family_name)
    keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
    if "encoder.conv_in.weight" not in keys or "decoder.conv_in.weight" not in keys:
        raise UserError("unknown checkpoint layout: no VAE (first_stage_model.encoder / decoder)")
    shape = lambda k: source.shape(prefix + k)  # noqa: E731
    levels = len(_indices(keys, r"encoder\.down\.(\d+)\."))
    per_level = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    scale = fam.scaling_factor
    if yaml_data:
        scale = _section(yaml_data, "model", "params").get("scale_factor", scale)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < 1e3:
            raise UserError(f"{YAML_PROBLEM}scale_factor should be a positive number, not {str(scale)[:20]}")
        scale = float(scale)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "sample_size": fam.resolution,
        "scaling_factor": scale,
        "force_upcast": fam.is_sdxl,
    }


def text_config(source: TensorSource, prefix: str, openclip: bool, drop_last_layer: bool) -> dict:
    """A transformers CLIPTextConfig as a dict. OpenCLIP v2 drops its last layer: SD 2 conditions on the penultimate."""
    keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
    if openclip:
        if "token_embedding.weight" not in keys:
            raise UserError(f"unknown checkpoint layout: no OpenCLIP text encoder under {prefix}")
        vocab, hidden = source.shape(prefix + "token_embedding.weight")
        positions = source.shape(prefix + "positional_embedding")[0]
        layers = len(_indices(keys, r"transformer\.resblocks\.(\d+)\."))
        intermediate = source.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        act, pad = "gelu", 0
        projection = source.shape(prefix + "text_projection")[1] if "text_projection" in keys else hidden
        if drop_last_layer:
            layers -= 1
    else:
        emb = "text_model.embeddings."
        if emb + "token_embedding.weight" not in keys:
            raise UserError(f"unknown checkpoint layout: no CLIP text encoder under {prefix}")
        vocab, hidden = source.shape(prefix + emb + "token_embedding.weight")
        positions = source.shape(prefix + emb + "position_embedding.weight")[0]
        layers = len(_indices(keys, r"text_model\.encoder\.layers\.(\d+)\."))
        intermediate = source.shape(prefix + "text_model.encoder.layers.0.mlp.fc1.weight")[0]
        act, pad, projection = "quick_gelu", 1, 768
    return {
        "architectures": ["CLIPTextModelWithProjection" if openclip and not drop_last_layer else "CLIPTextModel"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": positions, "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": projection, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad,
    }


# ---- the inference yaml for hosts ----

def render_yaml(family_name: str, unet: dict, vae: dict) -> tuple[str, bool]:
    """(yaml text, whether a host needs it): the family's reference yaml with this model's widths and depths.

    A host can guess SD's standard configs from the keys alone; it needs the yaml for v-prediction and for
    any width, depth or head count that differs from the standard release.
    """
    data = reference_yaml(family_name)
    standard = copy.deepcopy(data)
    params = data["model"]["params"]
    unet_params = (params.get("unet_config") or params["network_config"])["params"]
    levels = len(unet["block_out_channels"])
    base = unet["block_out_channels"][0]
    unet_params["model_channels"] = base
    unet_params["channel_mult"] = [c // base for c in unet["block_out_channels"]]
    unet_params["num_res_blocks"] = unet["layers_per_block"]
    unet_params["attention_resolutions"] = [2 ** i for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t][::-1]
    unet_params["context_dim"] = unet["cross_attention_dim"]
    unet_params["in_channels"], unet_params["out_channels"] = unet["in_channels"], unet["out_channels"]
    depths = list(unet["transformer_layers_per_block"]) if isinstance(unet["transformer_layers_per_block"], list) \
        else [unet["transformer_layers_per_block"]] * levels
    depth_value = depths[0] if len(set(depths)) == 1 and family_name != "sdxl" else depths
    unet_params["transformer_depth"] = depth_value
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * levels
    if "num_heads" in unet_params:
        unet_params["num_heads"] = heads[0]
    else:
        unet_params["num_head_channels"] = unet["block_out_channels"][-1] // heads[-1]
    if "adm_in_channels" in unet_params and unet.get("projection_class_embeddings_input_dim"):
        unet_params["adm_in_channels"] = unet["projection_class_embeddings_input_dim"]
    dd = params["first_stage_config"]["params"]["ddconfig"]
    vbase = vae["block_out_channels"][0]
    dd["ch"] = vbase
    dd["ch_mult"] = [c // vbase for c in vae["block_out_channels"]]
    dd["num_res_blocks"] = vae["layers_per_block"]
    dd["z_channels"] = vae["latent_channels"]
    params["first_stage_config"]["params"]["embed_dim"] = vae["latent_channels"]
    params["scale_factor"] = vae.get("scaling_factor", params.get("scale_factor"))
    needed = family(family_name).prediction_type == "v_prediction" or data != standard
    return yaml.safe_dump(data, sort_keys=False), needed
