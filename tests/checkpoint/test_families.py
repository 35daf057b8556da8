"""Family facts, detection and the offline tokenizers."""
from __future__ import annotations

import pytest

from dreambooth.errors import UserError
from dreambooth.checkpoint.detect import detect
from dreambooth.families import FAMILY_FACTS, MODEL_INFO_FILE, detect_keys, family_from_yaml, pipeline_class


def test_facts():
    assert {f: (x.resolution, x.prediction_type, x.is_sdxl) for f, x in FAMILY_FACTS.items()} == {
        "v1": (512, "epsilon", False), "v2": (512, "epsilon", False),
        "v2-v": (768, "v_prediction", False), "sdxl": (1024, "epsilon", True)}
    assert pipeline_class("sdxl").__name__ == "StableDiffusionXLPipeline"
    assert pipeline_class("v2-v").__name__ == "StableDiffusionPipeline"


def test_detection_from_keys_and_yaml(tmp_path):
    from pathlib import Path

    reference = Path(__file__).resolve().parents[2] / "dreambooth" / "resources" / "ldm"  # the releases' own yamls
    assert detect_keys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]).family == "v1"
    assert detect_keys(["model.diffusion_model.x", "cond_stage_model.model.ln_final.weight"]).family == "v2"
    assert detect_keys(["model.diffusion_model.x", "conditioner.embedders.1.model.ln_final.weight"]).family == "sdxl"
    assert detect_keys(["model.diffusion_model.x"], forced="v2-v").family == "v2-v"
    assert [family_from_yaml(reference / n) for n in
            ("v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml", "sd_xl_base.yaml")] == ["v1", "v2", "v2-v", "sdxl"]
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        detect_keys(["foo.bar"])
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="not a readable model yaml"):
        family_from_yaml(tmp_path / "bad.yaml")


def test_offline_tokenizers_match_clip(tmp_path):
    from transformers import CLIPTokenizer

    from dreambooth.families import family, write_tokenizer

    clip, open_clip = (CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / str(i), pad_token=pad)))
                       for i, pad in enumerate(family("sdxl").pad_tokens))
    ids = clip("a photo of a dog").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # OpenAI CLIP's ids
    assert open_clip("a photo of a dog").input_ids == ids
    assert clip.pad_token_id == 49407 and open_clip.pad_token_id == 0  # open_clip pads with "!"
    assert clip.model_max_length == 77 and len(clip) == 49408


def test_one_detector_for_files_and_diffusers_folders(created, tiny_sources, tmp_path):
    """detect() reads a single file (keys + yaml) and a diffusers folder (configs) by the same rule; a folder made
    elsewhere (without our record of the family) is told apart by its configs alone."""
    import shutil

    for fam, path in tiny_sources.items():
        assert detect(path).family == fam
        root, name = created[fam]
        working = root.model(name).working
        assert detect(working).family == fam
        foreign = tmp_path / fam
        shutil.copytree(working, foreign)
        (foreign / MODEL_INFO_FILE).unlink()
        assert detect(foreign).family == fam, fam
        assert detect(foreign).how == "from the diffusers configs"
    root, name = created["v1"]
    with pytest.raises(UserError, match="does not fit"):
        detect(root.model(name).working, forced="sdxl")
    assert detect(tiny_sources["v2"], forced="v2-v").family == "v2-v"
    with pytest.raises(UserError, match="no such file or folder"):
        detect(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not a diffusers folder"):
        detect(tmp_path)
