"""A source checkpoint's .yaml is read with bounds: bombs, depth, wrong kinds and impossible values are one line
naming the file, quickly, and no model is left behind."""
import shutil

import pytest
import yaml

from dreambooth.errors import UserError
from dreambooth.models import create_model
from dreambooth.store import DataRoot

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)) + "model: {target: x}\n"


def unet_yaml(**unet_params) -> str:
    return yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "scale_factor": unet_params.pop("scale_factor", 0.18215),
        "unet_config": {"params": unet_params},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}})


CASES = {
    "billion laughs": (LAUGHS, "aliases"),
    "100,000 brackets": ("model: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 levels"),
    "zero head channels": (unet_yaml(num_head_channels=0), "num_head_channels should be a whole number"),
    "a list where a mapping belongs": ("model:\n  params:\n    - 1\n    - 2\n", "model.params"),
    "NaN scale": (unet_yaml(scale_factor=float("nan")), "scale_factor should be a positive number"),
    "a string scale": (unet_yaml(scale_factor="big"), "scale_factor should be a positive number"),
    "not UTF-8": ("model: \udcff\n", "not a readable model yaml"),
    "too large": ("model: {}\n" + "#" * (2 << 20), "larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_yaml_beside_the_source(case, tiny_sources, tmp_path):
    text, said = CASES[case]
    source = tmp_path / "src.safetensors"
    shutil.copy(tiny_sources["v1"], source)
    (tmp_path / "src.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    root = DataRoot(tmp_path / "root").ensure()
    with pytest.raises(UserError) as e:
        create_model(root, "m", str(source))
    assert said in str(e.value) and "src.yaml" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert root.model_names() == [] and [p.name for p in root.dreambooth.iterdir()] == []
