"""The full-size SD1.5 and SDXL architectures, written once from the published model numbers, for the benchmarks.

diffusers / transformers config dicts per component; the benchmarks build random-weight models from them (on a
device, or on the meta device), so nothing is downloaded. tests/bench checks the published parameter counts.
"""
from __future__ import annotations

# CLIP ViT-L/14 text tower: SD1.5's text encoder and SDXL's first.
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
# OpenCLIP ViT-bigG/14 text tower, with its projection: SDXL's second text encoder.
BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
         "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
# SD1.5 and SDXL share the VAE architecture; SDXL's latents use another scale.
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
       "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}

ARCHITECTURES = {
    "sd15": {
        "family": "v1",
        "resolution": 512,
        "unet": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
                 "layers_per_block": 2, "cross_attention_dim": 768,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8},
        "vae": {**VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": CLIP_L,
    },
    "sdxl": {
        "family": "sdxl",
        "resolution": 1024,
        "unet": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
                 "layers_per_block": 2, "cross_attention_dim": 2048,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                 "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": CLIP_L,
        "text_encoder_2": BIG_G,
    },
}


def components(arch: str) -> dict[str, dict]:
    """The component configs of an architecture: unet, vae, text_encoder (and text_encoder_2 for SDXL)."""
    return {k: v for k, v in ARCHITECTURES[arch].items() if k not in ("family", "resolution")}


def text_encoder_configs(arch: str) -> list[dict]:
    configs = ARCHITECTURES[arch]
    return [configs[k] for k in ("text_encoder", "text_encoder_2") if k in configs]
