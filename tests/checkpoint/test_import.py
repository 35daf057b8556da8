"""Import details: dtypes, .ckpt sources, keys without a diffusers home, family rules, diffusers folders,
the trainer's hooks (training.json, in-memory weights, EMA UNet)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.checkpoint.export import write_single_file
from dreambooth.checkpoint.tiny import write_tiny_checkpoint
from dreambooth.config import Config
from dreambooth.errors import UserError
from dreambooth.models import create_model, export_model
from dreambooth.store import DataRoot


def _copy_with_yaml(src, dst, tensors):
    save_file(tensors, str(dst), metadata={"format": "pt"})
    if src.with_suffix(".yaml").is_file():
        shutil.copy(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    return dst


def test_fp16_source_stays_fp16(tiny_sources, tmp_path):
    src = tiny_sources["v1"]
    half = {k: v.half() for k, v in load_file(str(src)).items()}
    path = _copy_with_yaml(src, tmp_path / "half.safetensors", half)
    root = DataRoot(tmp_path / "root")
    model = create_model(root, "half", str(path))
    with safe_open(str(model.working / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    out = load_file(str(export_model(root, "half", out=tmp_path / "out.safetensors")))
    assert set(out) == set(half) and all(out[k].dtype == torch.float16 and torch.equal(out[k], v) for k, v in half.items())
    # The folder still loads as one dtype by default (transformers 5 would pick fp16 for the text encoder alone).
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(model.working), local_files_only=True)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a dog", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_ckpt_source_round_trips(tmp_path):
    src = write_tiny_checkpoint("v2", tmp_path / "tiny.ckpt", seed=3)
    assert src.with_suffix(".yaml").is_file()
    root = DataRoot(tmp_path / "root")
    create_model(root, "fromckpt", str(src))
    original = torch.load(str(src), weights_only=True)["state_dict"]
    out = load_file(str(export_model(root, "fromckpt", out=tmp_path / "out.safetensors")))
    assert set(out) == set(original) and all(torch.equal(out[k], v) for k, v in original.items())


def test_keys_without_a_diffusers_home_come_back(tiny_sources, tmp_path):
    src = tiny_sources["v1"]
    tensors = load_file(str(src))
    extras = {
        "betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.rand(1000),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
        "model_ema.diffusion_modelout2weight": tensors["model.diffusion_model.out.2.weight"].clone(),
    }
    path = _copy_with_yaml(src, tmp_path / "extras.safetensors", {**tensors, **extras})
    root = DataRoot(tmp_path / "root")
    model = create_model(root, "extras", str(path))
    out = load_file(str(export_model(root, "extras", out=tmp_path / "out.safetensors")))
    assert set(out) == set(tensors) | set(extras)
    assert all(torch.equal(out[k], v) for k, v in extras.items())
    # Once trained, the source's EMA copy is stale: it is left out, the schedule buffers stay.
    (model.working / "training.json").write_text(json.dumps({"step": 5, "epoch": 1}))
    trained = load_file(str(export_model(root, "extras", out=tmp_path / "trained.safetensors")))
    assert not any(k.startswith("model_ema.") for k in trained) and "betas" in trained


def test_family_rules(tiny_sources, tmp_path, caplog):
    root = DataRoot(tmp_path / "root")
    plain = tmp_path / "noyaml.safetensors"
    shutil.copy(tiny_sources["v2-v"], plain)  # an OpenCLIP file without its yaml: taken as v2, and said so
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        create_model(root, "guess", str(plain))
    assert Config.load(root.model("guess").config_path).model.family == "v2"
    assert "--family v2-v" in caplog.text
    create_model(root, "forced", str(plain), family="v2-v")
    config = Config.load(root.model("forced").config_path)
    assert config.model.family == "v2-v" and config.parameters.resolution == 768
    scheduler = json.loads((root.model("forced").working / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    create_model(root, "byyaml", str(tiny_sources["v2-v"]))  # the yaml beside it says parameterization: v
    assert Config.load(root.model("byyaml").config_path).model.family == "v2-v"
    with pytest.raises(UserError, match="does not fit"):
        create_model(root, "wrong", str(tiny_sources["v1"]), family="sdxl")
    assert not root.model("wrong").path.exists()


def test_diffusers_folder_source(created, tiny_sources, tmp_path):
    root, name = created["sdxl"]
    working = root.model(name).working
    other = DataRoot(tmp_path / "root")
    create_model(other, "copy", str(working))
    assert Config.load(other.model("copy").config_path).model.family == "sdxl"
    out = load_file(str(export_model(other, "copy", out=tmp_path / "out.safetensors")))
    source = load_file(str(tiny_sources["sdxl"]))
    assert set(out) == set(source) and all(torch.equal(out[k], v) for k, v in source.items())


def test_trainer_hooks(tiny_sources, tmp_path):
    root = DataRoot(tmp_path / "root")
    model = create_model(root, "hooks", str(tiny_sources["v1"]))
    (model.working / "training.json").write_text(json.dumps({"step": 12, "epoch": 3}))
    path = export_model(root, "hooks")
    assert path == root.checkpoints / "hooks_12.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["dreambooth.training"])["step"] == 12
    assert meta["modelspec.description"] == "DreamBooth, step 12, epoch 3"
    # In-memory weights replace the working ones (diffusers layout, transformers 5 names without text_model.).
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(str(model.working), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(model.working), subfolder="text_encoder")
    with torch.no_grad():
        unet.conv_out.weight.add_(1.0)
        text.get_input_embeddings().weight.mul_(2.0)
    out = load_file(str(write_single_file(model.working, tmp_path / "mem.safetensors",
                                          state_dicts={"unet": unet.state_dict(), "text_encoder": text.state_dict()})))
    assert torch.equal(out["model.diffusion_model.out.2.weight"], unet.conv_out.weight)
    assert torch.equal(out["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
                       text.get_input_embeddings().weight)
    # --ema exports working/unet_ema, and refuses when there is none.
    with pytest.raises(UserError, match="EMA"):
        export_model(root, "hooks", ema=True)
    unet.save_pretrained(str(model.working / "unet_ema"))
    ema = load_file(str(export_model(root, "hooks", ema=True, out=tmp_path / "ema.safetensors")))
    assert torch.equal(ema["model.diffusion_model.out.2.weight"], unet.conv_out.weight)


def test_text_encoder_saved_without_the_text_model_prefix(tiny_sources, tmp_path):
    """transformers 5 may save CLIPTextModel without `text_model.`; export still finds every tensor."""
    root = DataRoot(tmp_path / "root")
    model = create_model(root, "plain", str(tiny_sources["v1"]))
    weights = model.working / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.removeprefix("text_model."): v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    out = load_file(str(export_model(root, "plain", out=tmp_path / "out.safetensors")))
    source = load_file(str(tiny_sources["v1"]))
    assert set(out) == set(source) and all(torch.equal(out[k], v) for k, v in source.items())


def test_fp16_diffusers_folder_stays_fp16(tiny_sources, tmp_path):
    src = tiny_sources["v2"]
    half = _copy_with_yaml(src, tmp_path / "half.safetensors", {k: v.half() for k, v in load_file(str(src)).items()})
    root = DataRoot(tmp_path / "root")
    first = create_model(root, "first", str(half))
    second = create_model(root, "second", str(first.working))
    with safe_open(str(second.working / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    out = load_file(str(export_model(root, "second", out=tmp_path / "out.safetensors")))
    source = load_file(str(half))
    assert set(out) == set(source) and all(torch.equal(out[k], v) for k, v in source.items())
