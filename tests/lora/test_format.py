"""The kohya key names, the metadata, the webui's hashes and the settings (unit tier: no model is built)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dreambooth.errors import UserError

SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
SD1_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}


@pytest.mark.parametrize("family,part,module,expected", [
    # SD1 / SD2: kohya writes the diffusers UNet names
    ("v1", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("v2", "unet", "up_blocks.3.resnets.2.conv_shortcut", "lora_unet_up_blocks_3_resnets_2_conv_shortcut"),
    ("v1", "text_encoder", "text_model.encoder.layers.11.mlp.fc2", "lora_te_text_model_encoder_layers_11_mlp_fc2"),
    ("v2", "text_encoder", "encoder.layers.0.self_attn.out_proj",  # transformers 5 spelling
     "lora_te_text_model_encoder_layers_0_self_attn_out_proj"),
    # SDXL: kohya writes the single-file (SGM) UNet names
    ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("sdxl", "unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
     "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"),
    ("sdxl", "unet", "mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in"),
    ("sdxl", "unet", "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj"),
    ("sdxl", "unet", "down_blocks.1.resnets.0.conv1", "lora_unet_input_blocks_4_0_in_layers_2"),
    ("sdxl", "unet", "up_blocks.2.resnets.1.time_emb_proj", "lora_unet_output_blocks_7_0_emb_layers_1"),
    ("sdxl", "unet", "down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("sdxl", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj",
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("sdxl", "text_encoder_2", "encoder.layers.31.mlp.fc1", "lora_te2_text_model_encoder_layers_31_mlp_fc1"),
])
def test_kohya_names(family, part, module, expected):
    from dreambooth.lora.keys import KohyaNames

    names = KohyaNames(family, SDXL_UNET if family == "sdxl" else SD1_UNET)
    assert names(part, module) == expected


def test_which_layers_get_adapters():
    from dreambooth.lora.keys import is_target

    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    for name in (attn, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"):
        assert is_target("unet", name, "attention") and is_target("unet", name, "attention+ff+conv")
    for name in ("down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
                 "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "mid_block.resnets.1.conv2",
                 "up_blocks.0.resnets.0.conv_shortcut", "down_blocks.1.resnets.1.time_emb_proj"):
        assert not is_target("unet", name, "attention") and is_target("unet", name, "attention+ff+conv")
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2",
                 "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.1", "down_blocks.0.attentions.0.norm"):
        assert not is_target("unet", name, "attention+ff+conv"), name
    for prefix in ("text_model.", ""):  # transformers 4 and 5
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert is_target("text_encoder", f"{prefix}encoder.layers.3.self_attn.{proj}", "attention")
        assert not is_target("text_encoder", f"{prefix}encoder.layers.3.mlp.fc1", "attention")
        assert is_target("text_encoder_2", f"{prefix}encoder.layers.3.mlp.fc1", "attention+ff+conv")
    assert not is_target("text_encoder_2", "text_projection", "attention+ff+conv")
    with pytest.raises(UserError, match="lora_layers: 'all' is not one of"):
        is_target("unet", attn, "all")


def _adapters(rank=4, width=8, conv=False):
    from dreambooth.lora.weights import Adapter

    g = torch.Generator().manual_seed(0)
    if conv:
        return Adapter(torch.randn(rank, width, 3, 3, generator=g), torch.randn(width, rank, 1, 1, generator=g), 2.0)
    return Adapter(torch.randn(rank, width, generator=g), torch.randn(width, rank, generator=g), float(rank))


@pytest.mark.parametrize("family,version,v2,arch,resolution", [
    ("v1", "sd_v1", "False", "stable-diffusion-v1/lora", 512),
    ("v2", "sd_v2", "True", "stable-diffusion-v2-512/lora", 512),
    ("v2-v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", 768),
    ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", 1024),
])
def test_metadata(family, version, v2, arch, resolution):
    from dreambooth.lora.files import lora_metadata

    weights = {"unet": {"a": _adapters(8)}, "text_encoder": {"b": _adapters(4)}}
    meta = lora_metadata(family, "dog_500", weights, training={"step": 500, "epoch": 100, "learning_rate": 1e-4},
                         layers="attention+ff+conv")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == v2
    assert meta["ss_v_parameterization"] == str(family == "v2-v")
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8")
    assert json.loads(meta["ss_network_args"]) == {"layers": "attention+ff+conv", "conv_dim": "8", "conv_alpha": "8",
                                                   "text_encoder_dim": "4", "text_encoder_alpha": "4"}
    assert meta["ss_resolution"] == f"({resolution}, {resolution})" and meta["ss_steps"] == "500"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "dog_500"
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.resolution"] == f"{resolution}x{resolution}"
    assert len(meta["modelspec.date"]) == len("2026-01-01T00:00:00Z")
    assert json.loads(meta["dreambooth.training"])["learning_rate"] == 1e-4


def test_loha_and_lokr_files_say_their_network_type():
    from dreambooth.errors import UserError
    from dreambooth.lora.files import lora_metadata
    from dreambooth.lora.weights import Lycoris

    g = torch.Generator().manual_seed(0)
    loha = Lycoris("loha", {k: torch.randn(8, 4, generator=g) for k in ("hada_w1_a", "hada_w2_a")}
                   | {k: torch.randn(4, 8, generator=g) for k in ("hada_w1_b", "hada_w2_b")}, 8.0, 4, (8, 8))
    meta = lora_metadata("v1", "dog_10", {"unet": {"a": loha}})
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    with pytest.raises(UserError, match="one kind of adapter, not loha, lora"):
        lora_metadata("v1", "dog_10", {"unet": {"a": loha}, "text_encoder": {"b": _adapters(4)}})
    # LoKr with both factors full: loaders apply kron(w1, w2) unscaled, so the file's w1 carries alpha / rank
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(4, 4, generator=g)
    lokr = Lycoris("lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=2.0, rank=4, shape=(8, 8))
    assert torch.equal(lokr.tensors()["lokr_w1"], w1 * 0.5) and torch.allclose(lokr.delta(), torch.kron(w1, w2) * 0.5)
    pair = Lycoris("lokr", {"lokr_w1": w1, "lokr_w2_a": w2[:, :1], "lokr_w2_b": w2[:1]}, alpha=2.0, rank=1, shape=(8, 8))
    assert torch.equal(pair.tensors()["lokr_w1"], w1)  # a low-rank factor: loaders scale by alpha / its rank


def _independent_hashes(path):
    """The webui's LoRA hash and kohya's legacy hash, computed here from their definitions."""
    from safetensors import safe_open
    from safetensors.torch import save

    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        training_only = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    legacy = hashlib.sha256(save(tensors, metadata=training_only)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


@pytest.mark.parametrize("half", [False, True])
def test_file_tensors_hashes_and_atomic_write(tmp_path, half):
    from dreambooth.lora.files import save_lora
    from dreambooth.outputs import lora_prompt_tag
    from lora_helpers import read_lora

    weights = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": _adapters(8, 40000),
                        "down_blocks.0.resnets.0.conv1": _adapters(4, 8, conv=True)},
               "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": _adapters(2)}}
    out = save_lora(tmp_path / "Lora" / "dog_500.safetensors", "v1", SD1_UNET, weights, half=half,
                    training={"step": 500})
    tensors, meta = read_lora(out)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 8, 3, 3)
    assert tensors[f"{name}.lora_up.weight"].shape == (8, 4, 1, 1)
    assert tensors[f"{name}.alpha"].item() == 2.0 and tensors[f"{name}.alpha"].dtype == torch.float32
    assert tensors[f"{name}.lora_up.weight"].dtype == (torch.float16 if half else torch.float32)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert len(tensors) == 9
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _independent_hashes(out)
    assert out.stat().st_size > 0x110000  # the legacy hash reads real tensor bytes
    assert [p.name for p in out.parent.iterdir()] == ["dog_500.safetensors"]  # no temp file left
    assert lora_prompt_tag(out) == "<lora:dog_500:1>" and lora_prompt_tag(out, 0.75) == "<lora:dog_500:0.75>"
    with pytest.raises(UserError, match="must be named"):
        save_lora(tmp_path / "x.ckpt", "v1", SD1_UNET, weights)
    with pytest.raises(UserError, match="no adapters"):
        save_lora(tmp_path / "y.safetensors", "v1", SD1_UNET, {"unet": {}})


@pytest.mark.slow  # importing diffusers and peft alone takes seconds
def test_ranks_and_alphas_are_checked_against_the_model():
    from diffusers import UNet2DConditionModel

    from dreambooth.lora.weights import attach_adapters

    def unet():
        return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                    attention_head_dim=2, norm_num_groups=4)

    with pytest.raises(UserError, match="lora_unet_rank: must be a whole number of at least 1, got 0"):
        attach_adapters(unet(), "unet", 0, 1.0, "attention", setting="lora_unet_rank")
    with pytest.raises(UserError, match=r"lora_unet_rank: 9 is above the width 8 of the narrowest layer it adapts "
                                        r"\(down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_k\)"):
        attach_adapters(unet(), "unet", 9, 1.0, "attention", setting="lora_unet_rank")
    with pytest.raises(UserError, match="lora_unet_alpha: must be above 0"):
        attach_adapters(unet(), "unet", 2, 0.0, "attention", setting="lora_unet_rank")
    model = unet()
    names = attach_adapters(model, "unet", 8, 8.0, "attention+ff+conv", setting="lora_unet_rank")
    # 4 transformer blocks x (8 attention projections + proj_in, proj_out, 2 feed-forward) = 48; 8 resnets x (conv1,
    # conv2, time_emb_proj) = 24, plus the 5 whose channels change (conv_shortcut)
    assert len(names) == 48 + 24 + 5
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_settings_are_declared_in_their_group():
    from dreambooth.config import GROUPS, PARAMETER_SETTINGS, Config

    lora = {s.name: s for s in PARAMETER_SETTINGS if s.group == "lora"}
    assert "lora" in GROUPS
    assert set(lora) == {"use_lora", "lora_unet_rank", "lora_unet_alpha", "lora_text_encoder_rank",
                         "lora_text_encoder_alpha", "lora_unet_learning_rate", "lora_text_encoder_learning_rate",
                         "lora_dropout", "lora_layers", "lora_preview_weight", "lora_export_merged", "lora_type"}
    assert lora["lora_type"].choices == ("lora", "loha", "lokr", "dora") and lora["lora_type"].default == "lora"
    assert (lora["lora_unet_learning_rate"].default, lora["lora_text_encoder_learning_rate"].default) == (1e-4, 5e-5)
    assert lora["lora_layers"].choices == ("attention", "attention+ff+conv")
    with pytest.raises(UserError) as e:
        Config.from_dict({"parameters": {"lora_unet_rank": 0, "lora_text_encoder_alpha": 0, "lora_layers": "all"}})
    for words in ("parameters.lora_unet_rank: 0 is below the minimum 1",
                  "parameters.lora_text_encoder_alpha: 0.0 is below the minimum 0.01",
                  "parameters.lora_layers: 'all' is not one of"):
        assert words in str(e.value)


def test_ema_and_lora_together_are_refused():
    from dreambooth.config import Config

    with pytest.raises(UserError, match="parameters.use_ema: cannot be used with LoRA"):
        Config.from_dict({"parameters": {"use_ema": True, "use_lora": True}})
    assert Config.from_dict({"parameters": {"use_ema": True}}).parameters.use_ema


def test_the_optimizer_gets_the_lora_learning_rates_when_lora_is_on():
    from dreambooth.config import Parameters
    from dreambooth.train.optim import param_groups

    unet, te = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    p = Parameters(learning_rate=1e-6, text_encoder_learning_rate=2e-6, lora_unet_learning_rate=3e-4,
                   lora_text_encoder_learning_rate=4e-5)
    assert [g["lr"] for g in param_groups(p, unet, [te])] == [1e-6, 2e-6]
    lora = Parameters(**{**vars(p), "use_lora": True})
    assert [g["lr"] for g in param_groups(lora, unet, [te])] == [3e-4, 4e-5]


def test_a_models_lora_files_are_listed_with_their_prompt_tags(tmp_path):
    from dreambooth.outputs import lora_prompt_tag, output_pattern

    names = ("dog_10.safetensors", "dog_500.safetensors", "dog_500_extract_r8.safetensors", "dog_2.safetensors",
             "dogs_5.safetensors", "dog_x.safetensors", "dog_1_5.safetensors", ".dog_9.safetensors.tmp")
    mine = sorted(n for n in names if output_pattern("dog").match(n))
    assert mine == ["dog_10.safetensors", "dog_2.safetensors", "dog_500.safetensors", "dog_500_extract_r8.safetensors"]
    assert lora_prompt_tag(tmp_path / "dog_500_extract_r8.safetensors") == "<lora:dog_500_extract_r8:1>"
