"""The key map between diffusers component state dicts and the original single-file (LDM / SGM) layout.

Table-driven: for each component a list of (diffusers prefix, single-file prefix, inner renames) built from the
component's diffusers config (levels, res blocks per level, which levels have attention). A key is renamed by its
longest matching prefix and then by the inner renames of that block. A few tensors change shape on the way:
- "conv1x1": the VAE's mid attention is a 1x1 conv in LDM ([C, C, 1, 1]) and a linear in diffusers ([C, C]);
- "qkv": OpenCLIP stores q, k, v fused as in_proj_weight / in_proj_bias (concatenated on dim 0);
- "transpose": OpenCLIP's text_projection is applied as x @ P, diffusers' as a Linear (x @ W.T), so P = W.T.
"""
from __future__ import annotations

from dataclasses import dataclass

SAME, CONV1X1, QKV, TRANSPOSE = "same", "conv1x1", "qkv", "transpose"

RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0."))
OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
QKV_NAMES = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Block:
    diffusers: str  # diffusers prefix, e.g. "down_blocks.0.resnets.1."
    ldm: str  # single-file prefix (without the component prefix), e.g. "input_blocks.2.0."
    inner: tuple = ()  # (ldm name, diffusers name) renames right after the prefix


def unet_blocks(config: dict) -> list[Block]:
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    attention = ["CrossAttn" in t for t in config["down_block_types"]]
    blocks = [Block("time_embedding.linear_1.", "time_embed.0."), Block("time_embedding.linear_2.", "time_embed.2."),
              Block("add_embedding.linear_1.", "label_emb.0.0."), Block("add_embedding.linear_2.", "label_emb.0.2."),
              Block("conv_in.", "input_blocks.0.0."), Block("conv_norm_out.", "out.0."), Block("conv_out.", "out.2.")]
    stride = per_level + 1  # LDM numbers res blocks and the down/up sampler of a level in one sequence
    for i in range(levels):
        for j in range(per_level):
            index = 1 + i * stride + j
            blocks.append(Block(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", RESNET))
            if attention[i]:
                blocks.append(Block(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < levels - 1:
            blocks.append(Block(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * stride}.0.op."))
        up_attention = attention[levels - 1 - i]
        for j in range(per_level + 1):
            index = i * stride + j
            blocks.append(Block(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", RESNET))
            if up_attention:
                blocks.append(Block(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
        if i < levels - 1:
            blocks.append(Block(f"up_blocks.{i}.upsamplers.0.",
                                f"output_blocks.{i * stride + per_level}.{2 if up_attention else 1}."))
    blocks += [Block("mid_block.resnets.0.", "middle_block.0.", RESNET),
               Block("mid_block.attentions.0.", "middle_block.1."),
               Block("mid_block.resnets.1.", "middle_block.2.", RESNET)]
    return blocks


def vae_blocks(config: dict) -> list[Block]:
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    blocks = []
    for i in range(levels):
        for j in range(per_level):
            blocks.append(Block(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        if i < levels - 1:
            blocks.append(Block(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = levels - 1 - i  # LDM numbers decoder levels from the highest resolution
        for j in range(per_level + 1):
            blocks.append(Block(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET))
        if i < levels - 1:
            blocks.append(Block(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    for side in ("encoder", "decoder"):
        blocks += [Block(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", VAE_RESNET),
                   Block(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", VAE_RESNET),
                   Block(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTENTION),
                   Block(f"{side}.conv_norm_out.", f"{side}.norm_out."),
                   Block(f"{side}.conv_in.", f"{side}.conv_in."), Block(f"{side}.conv_out.", f"{side}.conv_out.")]
    blocks += [Block("quant_conv.", "quant_conv."), Block("post_quant_conv.", "post_quant_conv.")]
    return blocks


def clip_blocks(config: dict) -> list[Block]:
    """OpenAI CLIP (transformers layout in both files): the names are the same."""
    return [Block("text_model.", "text_model.")]


def openclip_blocks(config: dict) -> list[Block]:
    blocks = [Block("text_model.embeddings.token_embedding.", "token_embedding."),
              Block("text_model.final_layer_norm.", "ln_final.")]
    for i in range(config["num_hidden_layers"]):
        blocks.append(Block(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPENCLIP_LAYER))
    return blocks


@dataclass(frozen=True)
class Mapping:
    """How one single-file tensor is made from diffusers tensors (in order)."""
    ldm: str
    diffusers: tuple
    kind: str = SAME


class ComponentMap:
    """Renames between one diffusers component and its part of the single file (keys relative to the prefixes)."""

    def __init__(self, blocks: list[Block], openclip: bool = False, vae: bool = False):
        # Longest prefix first, so "conv_in." of the encoder never shadows a deeper block.
        self.by_diffusers = sorted(blocks, key=lambda b: -len(b.diffusers))
        self.by_ldm = sorted(blocks, key=lambda b: -len(b.ldm))
        self.openclip = openclip
        self.vae = vae

    def to_ldm(self, key: str) -> tuple[str, str] | None:
        """(single-file key, kind) for a diffusers key; None when it has no single-file home."""
        if self.openclip:
            special = self._openclip_to_ldm(key)
            if special:
                return special
        for block in self.by_diffusers:
            if key.startswith(block.diffusers):
                rest = key[len(block.diffusers):]
                for ldm_name, diffusers_name in block.inner:
                    if rest.startswith(diffusers_name):
                        rest = ldm_name + rest[len(diffusers_name):]
                        break
                kind = CONV1X1 if (self.vae and block.inner is VAE_ATTENTION and rest.endswith("weight")
                                   and not rest.startswith("norm.")) else SAME
                return block.ldm + rest, kind
        return None

    def to_diffusers(self, key: str) -> list[tuple[str, str]] | None:
        """[(diffusers key, kind)] for a single-file key (three for a fused qkv); None when it has no home."""
        if self.openclip:
            special = self._openclip_to_diffusers(key)
            if special:
                return special
        for block in self.by_ldm:
            if key.startswith(block.ldm):
                rest = key[len(block.ldm):]
                for ldm_name, diffusers_name in block.inner:
                    if rest.startswith(ldm_name):
                        rest = diffusers_name + rest[len(ldm_name):]
                        break
                kind = CONV1X1 if (self.vae and block.inner is VAE_ATTENTION and rest.endswith("weight")
                                   and not rest.startswith("group_norm.")) else SAME
                return [(block.diffusers + rest, kind)]
        return None

    # OpenCLIP tensors that are not plain renames
    def _openclip_to_ldm(self, key):
        if key == "text_model.embeddings.position_embedding.weight":
            return "positional_embedding", SAME
        if key == "text_projection.weight":
            return "text_projection", TRANSPOSE
        for name in QKV_NAMES:
            marker = f".self_attn.{name}."
            if key.startswith("text_model.encoder.layers.") and marker in key:
                layer = key.split(".")[3]
                suffix = key.rsplit(".", 1)[1]  # weight or bias
                return f"transformer.resblocks.{layer}.attn.in_proj_{suffix}", QKV
        return None

    def _openclip_to_diffusers(self, key):
        if key == "positional_embedding":
            return [("text_model.embeddings.position_embedding.weight", SAME)]
        if key == "text_projection":
            return [("text_projection.weight", TRANSPOSE)]
        if key.startswith("transformer.resblocks.") and ".attn.in_proj_" in key:
            layer = key.split(".")[2]
            suffix = key.rsplit("_", 1)[1]
            return [(f"text_model.encoder.layers.{layer}.self_attn.{n}.{suffix}", QKV) for n in QKV_NAMES]
        return None


def component_map(component: str, config: dict, openclip: bool = False) -> ComponentMap:
    if component == "unet":
        return ComponentMap(unet_blocks(config))
    if component == "vae":
        return ComponentMap(vae_blocks(config), vae=True)
    if openclip:
        return ComponentMap(openclip_blocks(config), openclip=True)
    return ComponentMap(clip_blocks(config))
