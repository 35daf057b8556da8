"""Family facts, detection and the offline tokenizers."""
from __future__ import annotations

import pytest

from dreambooth.errors import UserError
from dreambooth.families import FAMILY_FACTS, detect_family, family_from_yaml, load_tokenizers, pipeline_class


def test_facts():
    assert {f: (x.resolution, x.prediction_type, x.is_sdxl) for f, x in FAMILY_FACTS.items()} == {
        "v1": (512, "epsilon", False), "v2": (512, "epsilon", False),
        "v2-v": (768, "v_prediction", False), "sdxl": (1024, "epsilon", True)}
    assert pipeline_class("sdxl").__name__ == "StableDiffusionXLPipeline"
    assert pipeline_class("v2-v").__name__ == "StableDiffusionPipeline"


def test_detection_from_keys_and_yaml(tmp_path):
    from pathlib import Path

    reference = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "ldm-configs"
    assert detect_family(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) == "v1"
    assert detect_family(["model.diffusion_model.x", "cond_stage_model.model.ln_final.weight"]) == "v2"
    assert detect_family(["model.diffusion_model.x", "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_family(["model.diffusion_model.x"], forced="v2-v") == "v2-v"
    assert [family_from_yaml(reference / n) for n in
            ("v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml", "sd_xl_base.yaml")] == ["v1", "v2", "v2-v", "sdxl"]
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        detect_family(["foo.bar"])
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="not a readable model yaml"):
        family_from_yaml(tmp_path / "bad.yaml")


def test_offline_tokenizers_match_clip():
    clip, open_clip = load_tokenizers("sdxl")
    ids = clip("a photo of a dog").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # OpenAI CLIP's ids
    assert open_clip("a photo of a dog").input_ids == ids
    assert clip.pad_token_id == 49407 and open_clip.pad_token_id == 0  # open_clip pads with "!"
    assert clip.model_max_length == 77 and len(clip) == 49408
