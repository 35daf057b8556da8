"""An independent reader of LoRA files, written for the tests from the key-matching rules of the AUTOMATIC1111 webui
1.10.1 built-in Lora extension (extensions-builtin/Lora: networks.py load_network and
assign_network_names_to_compvis_modules, network_lora.py, network.py), applied to a single-file checkpoint.

It shares no code with dreambooth/lora. The rules, as the webui applies them:
1. Layer names: every module of the loaded model is named by its path with dots as underscores: UNet modules below
   `model.` (so `diffusion_model_...`); for v1/v2 the text encoder's modules below `cond_stage_model.` (v1:
   `transformer_text_model_...`, v2 OpenCLIP: `model_transformer_resblocks_N_attn`, one MultiheadAttention with a
   fused in_proj); for SDXL embedder i's modules as `{i}_...`.
2. A file key is split at its first dot into (network name, part). The network name is converted by a fixed table
   (diffusers UNet names of the SD1/SD2 layout, `lora_te_` / `lora_te2_` CLIP names to OpenCLIP names for v2 and
   SDXL's second encoder), then looked up; if absent, a trailing `_q_proj` / `_k_proj` / `_v_proj` is dropped and the
   rest looked up (the fused attention); if still absent, `lora_unet` becomes `diffusion_model`, or
   `lora_te1_text_model` becomes `0_transformer_text_model` (then `transformer_text_model`). Else: unmatched.
3. A module's change to its layer's weight (network_lora.py, network_hada.py, network_lokr.py, network.py
   finalize_updown), times its scale: alpha / dim where the module has a dim and an alpha, else 1.
   - LoRA (`lora_up.weight`, `lora_down.weight`): up @ down; dim = down's rows.
   - LoHa (`hada_w1_a` ... `hada_w2_b`): (w1_a @ w1_b) * (w2_a @ w2_b) as a (w1_a rows, w1_b columns) matrix;
     dim = w1_b's rows.
   - LoKr (`lokr_w1` or `lokr_w1_a` @ `lokr_w1_b`, the same for w2): kron(w1, w2) (w1 with two trailing axes when
     w2 is a 4-d kernel), shaped as the weight for a convolution, else (w1 rows x w2 rows, w1 cols x w2 cols);
     dim = w2_b's rows, else w1_b's, else none (scale 1 whatever alpha says).
   The product is reshaped to the weight when their sizes agree. A MultiheadAttention gets its q, k, v changes
   stacked into in_proj_weight and is changed only when q, k, v and out_proj all have modules.
4. A module with a `dora_scale` (network.py apply_weight_decompose): with M = W + change, its change becomes
   M x dora_scale / ||M|| - W, ||M|| the norm of each input column (over the outputs and the kernel); the
   multiplier scales that. (On a fused attention the shapes do not fit and the webui fails.)
"""
from __future__ import annotations

import re

import torch

SUFFIX_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def webui_layers(checkpoint_keys) -> dict[str, tuple[str, str]]:
    """{webui layer name: (single-file key of its weight, "weight" / "in_proj" / "container")} for a checkpoint."""
    layers = {}
    for key in checkpoint_keys:
        if key.endswith(".in_proj_weight"):
            module, kind = key[: -len(".in_proj_weight")], "in_proj"
        elif key.endswith(".weight"):
            module, kind = key[: -len(".weight")], "weight"
        else:
            continue
        if module.startswith("model."):
            name = module[len("model."):]
        elif module.startswith("cond_stage_model."):
            name = module[len("cond_stage_model."):]
        elif module.startswith("conditioner.embedders."):
            index, rest = module[len("conditioner.embedders."):].split(".", 1)
            name = f"{index}_{rest}"
        else:
            continue  # the VAE has no LoRA layers in the webui
        layers[name.replace(".", "_")] = (key, kind)
        # the webui names every module, containers too (its v2 test is whether `model_transformer_resblocks` exists)
        pieces = name.split(".")
        for i in range(1, len(pieces)):
            layers.setdefault("_".join(pieces[:i]), ("", "container"))
    return layers


def _resnet_suffix(kind: str, rest: str) -> str:
    return SUFFIX_RESNET.get(rest, rest) if kind == "resnets" else rest


def _openclip(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def convert_name(name: str, is_sd2: bool) -> str:
    """The webui's table from diffusers / transformers LoRA names to its layer names (else the name unchanged)."""
    m = re.match(r"lora_unet_conv_in(.*)", name)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", name)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return (f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_"
                f"{_resnet_suffix(kind, rest)}")
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        kind, index, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{_resnet_suffix(kind, rest)}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return (f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_"
                f"{_resnet_suffix(kind, rest)}")
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
    return name


def match(name: str, layers: dict) -> tuple[str, str] | None:
    """(key the module is filed under, webui layer it changes) for a network name; None when unmatched."""
    is_sd2 = "model_transformer_resblocks" in layers
    key = convert_name(name, is_sd2)
    if key in layers:
        return key, key
    m = X_PROJ.match(key)
    if m and m[1] in layers:
        return key, m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return (key, key) if key in layers else None
    if "lora_te1_text_model" in name:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", replacement)
            if key in layers:
                return key, key
    return None


def read(lora: dict[str, torch.Tensor], checkpoint_keys) -> tuple[dict, list[str]]:
    """({filed key: (layer, {part: tensor})}, unmatched file keys)."""
    layers = webui_layers(checkpoint_keys)
    modules, unmatched = {}, []
    for file_key, tensor in lora.items():
        name, _, part = file_key.partition(".")
        found = match(name, layers)
        if found is None:
            unmatched.append(file_key)
            continue
        key, layer = found
        modules.setdefault(key, (layer, {}))[1][part] = tensor
    return modules, unmatched


def _updown(parts: dict, shape) -> torch.Tensor:
    w = {k: v.float() for k, v in parts.items()}
    if "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        product = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    elif "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        product = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    else:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = (w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w
               else None)
        output = tuple(shape) if len(shape) == 4 else (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        product = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2).reshape(output)
    scale = float(w["alpha"]) / dim if "alpha" in w and dim is not None else 1.0
    assert product.numel() == torch.Size(shape).numel(), (product.shape, shape)
    return product.reshape(shape) * scale


def apply(lora: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor], multiplier: float = 1.0) -> dict:
    """The checkpoint's tensors with the LoRA applied the webui's way (a new dict; unmatched keys raise)."""
    modules, unmatched = read(lora, checkpoint.keys())
    assert not unmatched, f"unmatched LoRA keys: {unmatched[:5]}"
    layers = webui_layers(checkpoint.keys())
    out = {k: v.float().clone() for k, v in checkpoint.items()}
    fused: dict[str, dict] = {}
    for key, (layer, parts) in modules.items():
        weight_key, kind = layers[layer]
        if kind == "in_proj":  # an OpenCLIP attention: q, k, v and out_proj together, or nothing
            fused.setdefault(layer, {})[key[len(layer) + 1:]] = parts
            continue
        parent = layer[: -len("_out_proj")]
        if layer.endswith("_out_proj") and layers.get(parent, ("", ""))[1] == "in_proj":
            fused.setdefault(parent, {})["out_proj"] = parts  # applied by the attention, with q, k, v
            continue
        change = _updown(parts, out[weight_key].shape)
        if "dora_scale" in parts:
            merged = out[weight_key] + change
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
            change = merged * (parts["dora_scale"].float() / norm) - out[weight_key]
        out[weight_key] += multiplier * change
    for layer, projections in fused.items():
        assert set(projections) == {"q_proj", "k_proj", "v_proj", "out_proj"}, sorted(projections)
        assert not any("dora_scale" in p for p in projections.values()), f"{layer}: DoRA on a fused attention"
        weight_key, _ = layers[layer]
        third = out[weight_key].shape[0] // 3
        stacked = torch.cat([_updown(projections[p], (third, out[weight_key].shape[1]))
                             for p in ("q_proj", "k_proj", "v_proj")])
        out[weight_key] += multiplier * stacked
        out_key = layers[layer + "_out_proj"][0]
        out[out_key] += multiplier * _updown(projections["out_proj"], out[out_key].shape)
    return out
