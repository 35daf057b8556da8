"""The key names and shapes of an original single-file release, derived from its yaml the way the original code
(ldm/sgm openaimodel.UNetModel, Encoder/Decoder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder) builds its modules.

Written module by module, independently of the product's key table, so the two check each other.
"""
from __future__ import annotations

import yaml


def _conv(prefix, cout, cin, k=3, bias=True):
    out = {prefix + "weight": (cout, cin, k, k)}
    if bias:
        out[prefix + "bias"] = (cout,)
    return out


def _linear(prefix, cout, cin, bias=True):
    out = {prefix + "weight": (cout, cin)}
    if bias:
        out[prefix + "bias"] = (cout,)
    return out


def _norm(prefix, c):
    return {prefix + "weight": (c,), prefix + "bias": (c,)}


def _resblock(p, cin, cout, emb):
    keys = {**_norm(p + "in_layers.0.", cin), **_conv(p + "in_layers.2.", cout, cin),
            **_linear(p + "emb_layers.1.", cout, emb), **_norm(p + "out_layers.0.", cout),
            **_conv(p + "out_layers.3.", cout, cout)}
    if cin != cout:
        keys.update(_conv(p + "skip_connection.", cout, cin, k=1))
    return keys


def _transformer(p, ch, depth, context, linear):
    proj = (lambda q: _linear(q, ch, ch)) if linear else (lambda q: _conv(q, ch, ch, k=1))
    keys = {**_norm(p + "norm.", ch), **proj(p + "proj_in."), **proj(p + "proj_out.")}
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1", ch), ("attn2", context)):
            keys.update(_linear(f"{b}{attn}.to_q.", ch, ch, bias=False))
            keys.update(_linear(f"{b}{attn}.to_k.", ch, kv, bias=False))
            keys.update(_linear(f"{b}{attn}.to_v.", ch, kv, bias=False))
            keys.update(_linear(f"{b}{attn}.to_out.0.", ch, ch))
        keys.update(_linear(b + "ff.net.0.proj.", ch * 8, ch))  # GEGLU: two halves of 4 x ch
        keys.update(_linear(b + "ff.net.2.", ch, ch * 4))
        for n in (1, 2, 3):
            keys.update(_norm(f"{b}norm{n}.", ch))
    return keys


def unet_keys(params: dict) -> dict:
    C = params["model_channels"]
    mult = params["channel_mult"]
    R = params["num_res_blocks"]
    attn_res = params["attention_resolutions"]
    depth = params.get("transformer_depth", 1)
    depth = depth if isinstance(depth, list) else [depth] * len(mult)
    context = params["context_dim"]
    linear = params.get("use_linear_in_transformer", False)
    emb = 4 * C
    keys = {**_linear("time_embed.0.", emb, C), **_linear("time_embed.2.", emb, emb)}
    if params.get("adm_in_channels"):
        keys.update(_linear("label_emb.0.0.", emb, params["adm_in_channels"]))
        keys.update(_linear("label_emb.0.2.", emb, emb))
    keys.update(_conv("input_blocks.0.0.", C, params["in_channels"]))
    chans, ch, ds, index = [C], C, 1, 1
    for level, m in enumerate(mult):
        for _ in range(R):
            keys.update(_resblock(f"input_blocks.{index}.0.", ch, m * C, emb))
            ch = m * C
            if ds in attn_res:
                keys.update(_transformer(f"input_blocks.{index}.1.", ch, depth[level], context, linear))
            chans.append(ch)
            index += 1
        if level != len(mult) - 1:
            keys.update(_conv(f"input_blocks.{index}.0.op.", ch, ch))
            chans.append(ch)
            index += 1
            ds *= 2
    keys.update(_resblock("middle_block.0.", ch, ch, emb))
    keys.update(_transformer("middle_block.1.", ch, depth[-1], context, linear))
    keys.update(_resblock("middle_block.2.", ch, ch, emb))
    index = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(R + 1):
            keys.update(_resblock(f"output_blocks.{index}.0.", ch + chans.pop(), m * C, emb))
            ch = m * C
            sub = 1
            if ds in attn_res:
                keys.update(_transformer(f"output_blocks.{index}.1.", ch, depth[level], context, linear))
                sub = 2
            if level and i == R:
                keys.update(_conv(f"output_blocks.{index}.{sub}.conv.", ch, ch))
                ds //= 2
            index += 1
    keys.update(_norm("out.0.", C))
    keys.update(_conv("out.2.", params["out_channels"], C))
    return keys


def _vae_res(p, cin, cout):
    keys = {**_norm(p + "norm1.", cin), **_conv(p + "conv1.", cout, cin), **_norm(p + "norm2.", cout),
            **_conv(p + "conv2.", cout, cout)}
    if cin != cout:
        keys.update(_conv(p + "nin_shortcut.", cout, cin, k=1))
    return keys


def _vae_mid(p, c):
    keys = {**_vae_res(p + "block_1.", c, c), **_vae_res(p + "block_2.", c, c), **_norm(p + "attn_1.norm.", c)}
    for n in ("q", "k", "v", "proj_out"):
        keys.update(_conv(f"{p}attn_1.{n}.", c, c, k=1))
    return keys


def vae_keys(dd: dict, embed: int) -> dict:
    ch, mult, R, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    keys = _conv("encoder.conv_in.", ch, dd["in_channels"])
    cin = ch
    for i, m in enumerate(mult):
        for j in range(R):
            keys.update(_vae_res(f"encoder.down.{i}.block.{j}.", cin, ch * m))
            cin = ch * m
        if i != len(mult) - 1:
            keys.update(_conv(f"encoder.down.{i}.downsample.conv.", cin, cin))
    keys.update(_vae_mid("encoder.mid.", cin))
    keys.update(_norm("encoder.norm_out.", cin))
    keys.update(_conv("encoder.conv_out.", 2 * z, cin))
    cin = ch * mult[-1]
    keys.update(_conv("decoder.conv_in.", cin, z))
    keys.update(_vae_mid("decoder.mid.", cin))
    for i in reversed(range(len(mult))):
        for j in range(R + 1):
            keys.update(_vae_res(f"decoder.up.{i}.block.{j}.", cin, ch * mult[i]))
            cin = ch * mult[i]
        if i != 0:
            keys.update(_conv(f"decoder.up.{i}.upsample.conv.", cin, cin))
    keys.update(_norm("decoder.norm_out.", cin))
    keys.update(_conv("decoder.conv_out.", dd["out_ch"], cin))
    keys.update(_conv("quant_conv.", 2 * embed, 2 * z, k=1))
    keys.update(_conv("post_quant_conv.", z, embed, k=1))
    return keys


def clip_keys(width=768, layers=12, vocab=49408, positions=77) -> dict:
    """transformers CLIPTextModel (OpenAI ViT-L/14 text tower), as FrozenCLIPEmbedder holds it."""
    t = "text_model."
    keys = {t + "embeddings.token_embedding.weight": (vocab, width),
            t + "embeddings.position_embedding.weight": (positions, width)}
    for i in range(layers):
        p = f"{t}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys.update(_linear(f"{p}self_attn.{n}.", width, width))
        keys.update(_norm(p + "layer_norm1.", width))
        keys.update(_norm(p + "layer_norm2.", width))
        keys.update(_linear(p + "mlp.fc1.", 4 * width, width))
        keys.update(_linear(p + "mlp.fc2.", width, 4 * width))
    keys.update(_norm(t + "final_layer_norm.", width))
    return keys


def openclip_keys(width: int, layers: int, projection: int, vocab=49408, positions=77) -> dict:
    """open_clip's text tower as FrozenOpenCLIPEmbedder(2) keeps it (the visual tower deleted)."""
    keys = {"token_embedding.weight": (vocab, width), "positional_embedding": (positions, width),
            "text_projection": (width, projection), "logit_scale": ()}
    keys.update(_norm("ln_final.", width))
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        keys.update({p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,)})
        keys.update(_linear(p + "attn.out_proj.", width, width))
        keys.update(_norm(p + "ln_1.", width))
        keys.update(_norm(p + "ln_2.", width))
        keys.update(_linear(p + "mlp.c_fc.", 4 * width, width))
        keys.update(_linear(p + "mlp.c_proj.", width, 4 * width))
    return keys


def release_keys(yaml_path) -> dict:
    """{key: shape} of the original release a reference yaml describes (EMA and schedule buffers left out)."""
    data = yaml.safe_load(open(yaml_path, encoding="utf-8"))
    params = data["model"]["params"]
    unet = (params.get("unet_config") or params["network_config"])["params"]
    first = params["first_stage_config"]["params"]
    keys = {"model.diffusion_model." + k: v for k, v in unet_keys(unet).items()}
    keys.update({"first_stage_model." + k: v for k, v in vae_keys(first["ddconfig"], first["embed_dim"]).items()})
    if "conditioner_config" in params:  # SDXL: CLIP ViT-L + OpenCLIP ViT-bigG
        keys.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_keys().items()})
        keys.update({"conditioner.embedders.1.model." + k: v for k, v in openclip_keys(1280, 32, 1280).items()})
    elif "OpenCLIP" in params["cond_stage_config"]["target"]:  # SD 2: OpenCLIP ViT-H
        keys.update({"cond_stage_model.model." + k: v for k, v in openclip_keys(1024, 24, 1024).items()})
    else:
        keys.update({"cond_stage_model.transformer." + k: v for k, v in clip_keys().items()})
    return keys
