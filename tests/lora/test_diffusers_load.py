"""Our LoRA file, loaded by diffusers' own `load_lora_weights` (its kohya reader) into the untouched base pipeline,
gives the same text conditioning and UNet prediction as the peft-adapted model it was exported from."""
from __future__ import annotations

import pytest
import torch

from lora_helpers import add_random_adapters, load_pipeline, parts_of, relative_error, unet_output

# Relative error allowed (Frobenius norm of the difference / norm of the expected output): both sides run the same
# fp32 arithmetic with the low-rank path applied separately, in a different order. For an fp16 file the reference
# model's adapters are rounded to fp16 first, so the file's storage is checked exactly, not the rounding itself.
TOLERANCE = 1e-5


def _diffusers_can_load_lora() -> tuple[bool, str]:
    from diffusers.utils import USE_PEFT_BACKEND

    if USE_PEFT_BACKEND:
        return True, ""
    import diffusers
    import transformers
    return False, (f"diffusers {diffusers.__version__} loads LoRAs only through peft with transformers >= 4.34 "
                   f"(this stack: transformers {transformers.__version__}); the webui reader test covers this stack")


@pytest.mark.slow
@pytest.mark.parametrize("family,layers,half", [
    ("v1", "attention", False), ("v1", "attention+ff+conv", True),
    ("v2", "attention+ff+conv", False),
    ("sdxl", "attention", True), ("sdxl", "attention+ff+conv", False),
])
def test_diffusers_load_lora_weights_matches_the_peft_model(lora_models, family, layers, half):
    ok, why = _diffusers_can_load_lora()
    if not ok:
        pytest.skip(why)
    from dreambooth.checkpoint.convert import read_configs
    from dreambooth.lora.files import save_lora
    from dreambooth.lora.weights import adapters_of

    root, name = lora_models[family]
    working = root.model(name).working
    trained = load_pipeline(working, family)
    parts = add_random_adapters(trained, family, layers, seed=7)
    if half:
        with torch.no_grad():
            for module in parts.values():
                for n, p in module.named_parameters():
                    if ".lora_" in n:
                        p.copy_(p.half().float())
    expected, expected_context = unet_output(trained, family)

    weights = {part: adapters_of(module) for part, module in parts.items()}
    config = read_configs(working, family)
    out = save_lora(root.lora / f"{name}-{layers}-{half}.safetensors", family, config["unet"], weights, half=half,
                    layers=layers)

    base = load_pipeline(working, family)
    untouched, _ = unet_output(base, family)
    base.load_lora_weights(str(out))
    got, got_context = unet_output(base, family)

    assert relative_error(expected, untouched) > 0.05  # the adapters really change the output
    assert relative_error(got_context, expected_context) < TOLERANCE
    assert relative_error(got, expected) < TOLERANCE
    # every adapter of the file landed on the module it belongs to, and nothing else was adapted
    from peft.tuners.lora import LoraLayer
    for part, module in parts_of(base, family).items():
        loaded = {n for n, m in module.named_modules() if isinstance(m, LoraLayer)}
        assert loaded == set(weights[part]), part
