"""tiny-checkpoint -> create -> export, for every family, checked against the source and against diffusers'
own single-file loader (offline)."""
from __future__ import annotations

import re
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.families import family, pipeline_class
from dreambooth.models import export_model

from webui_safe import restricted_load

FAMILIES = ("v1", "v2", "v2-v", "sdxl")

ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def _export(created, fam, tmp_path, fmt="safetensors", half=False):
    root, name = created[fam]
    return export_model(root, name, fmt=fmt, half=half, out=tmp_path / f"{fam}.{fmt}")


def _load(path):
    if path.suffix == ".ckpt":
        return restricted_load(path)["state_dict"]
    return load_file(str(path))


@pytest.mark.parametrize("fam", FAMILIES)
def test_untouched_export_gives_back_the_source(fam, tiny_sources, created, tmp_path):
    source = load_file(str(tiny_sources[fam]))
    for fmt in ("safetensors", "ckpt"):
        out = _load(_export(created, fam, tmp_path, fmt))
        assert set(out) == set(source)
        for key, value in source.items():
            assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    yaml_text = (tmp_path / f"{fam}.yaml").read_text()
    assert ("parameterization: v" in yaml_text) == (fam == "v2-v")
    assert "model_channels: 32" in yaml_text  # non-standard widths are described for the host


@pytest.mark.parametrize("fam", FAMILIES)
def test_half_export(fam, tiny_sources, created, tmp_path):
    source = load_file(str(tiny_sources[fam]))
    for fmt in ("safetensors", "ckpt"):
        out = _load(_export(created, fam, tmp_path, fmt, half=True))
        assert set(out) == set(source)
        for key, value in source.items():
            expected = value.half() if value.is_floating_point() else value
            assert out[key].dtype == expected.dtype and torch.equal(out[key], expected), key


@pytest.mark.parametrize("fam", FAMILIES)
def test_ckpt_passes_the_webui_restricted_loader(fam, created, tmp_path):
    path = _export(created, fam, tmp_path, "ckpt")
    names = zipfile.ZipFile(path).namelist()
    assert names and all(ZIP_NAMES.match(n) for n in names), [n for n in names if not ZIP_NAMES.match(n)]
    data = restricted_load(path)
    assert list(data) == ["state_dict"] and all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())


@pytest.mark.parametrize("fam", FAMILIES)
def test_safetensors_metadata_is_modelspec(fam, created, tmp_path):
    from safetensors import safe_open

    with safe_open(str(_export(created, fam, tmp_path)), "pt") as f:
        meta = f.metadata()
    facts = family(fam)
    assert meta["modelspec.architecture"] == facts.architecture
    assert meta["modelspec.resolution"] == f"{facts.resolution}x{facts.resolution}"
    assert meta["modelspec.prediction_type"] == ("v" if fam == "v2-v" else "epsilon")
    assert meta["modelspec.title"] == fam and meta["modelspec.date"].startswith("20")


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_diffusers_from_single_file_reads_the_same_model(fam, created, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, name = created[fam]
    working = str(root.model(name).working)
    cls = pipeline_class(fam)
    reference = cls.from_pretrained(working, local_files_only=True)
    assert reference.scheduler.config.prediction_type == family(fam).prediction_type
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if fam == "sdxl" else [])
    for fmt, half in (("safetensors", False), ("ckpt", True)):
        path = _export(created, fam, tmp_path, fmt, half)
        loaded = cls.from_single_file(str(path), config=working, local_files_only=True)
        for component in components:
            want = getattr(reference, component).state_dict()
            got = getattr(loaded, component).state_dict()
            assert set(got) == set(want), component
            for key, value in want.items():
                value = value.half().float() if half else value
                assert torch.equal(got[key].float(), value), f"{fmt} {component} {key}"
        if not half:
            kwargs = dict(prompt="a photo of zwx dog", num_inference_steps=2, height=64, width=64, output_type="np")
            a = reference(generator=torch.Generator().manual_seed(7), **kwargs).images
            b = loaded(generator=torch.Generator().manual_seed(7), **kwargs).images
            assert a.std() > 0.01  # a real image, not a constant
            assert abs(a - b).max() < 1e-5
