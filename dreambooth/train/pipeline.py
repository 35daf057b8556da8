"""Image generation with the model being trained (class images before training, previews during it).

The diffusers pipeline is built from the in-memory components, so previews show the weights as they are now. Those
parts are held in different dtypes (precision.DtypePlan: the trained UNet in fp32 or bf16, frozen text encoders and
the VAE in fp16 or bf16 on a GPU, SDXL's VAE in fp32 under fp16), so one rule says how generation computes: the
denoising loop (text encoders and UNet) runs under autocast in the run's mixed precision, as the training step does,
and the latents are decoded afterwards in the VAE's own dtype, without autocast (an fp32 VAE kept for its range stays
fp32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler


@dataclass
class Generation:
    pipe: object                      # the diffusers pipeline over the in-memory parts
    autocast: "torch.dtype | None"    # the run's mixed precision (None: everything computes in its own dtype)

    def denoising(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.pipe.unet.device.type, dtype=self.autocast)

    def decode(self, latents: torch.Tensor) -> list:
        """Latents -> PIL images, in the VAE's own dtype."""
        vae = self.pipe.vae
        device_type = vae.device.type
        with torch.autocast(device_type, enabled=False) if self.autocast is not None else contextlib.nullcontext():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def make_pipeline(unet, vae, text_encoders, tokenizers, scheduler_config, sdxl: bool,
                  autocast: torch.dtype | None = None) -> Generation:
    scheduler = DDIMScheduler.from_config(scheduler_config)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Generation(pipe, autocast)


class Stopped(Exception):
    """`generate` was asked to stop between two denoising steps."""


def generate(gen: Generation, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int,
             width: int, height: int, stop: Callable[[], bool] | None = None):
    """One image (PIL) for a fixed seed; see `generate_batch`."""
    return generate_batch(gen, [prompt], negative_prompt, steps, guidance_scale, [seed], width, height, stop)[0]


def generate_batch(gen: Generation, prompts: list[str], negative_prompt: str, steps: int, guidance_scale: float,
                   seeds: list[int], width: int, height: int, stop: Callable[[], bool] | None = None) -> list:
    """Images (PIL) for several prompts in one pipeline call, each from its own seed: an image does not depend on
    the batch it was made in (each starts from its own seed's noise). `stop()` is asked after each denoising step
    (diffusers' callback_on_step_end, in 0.30 as in the newest); when it says so, Stopped is raised."""
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("one seed per prompt, at least one prompt")
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    extra = {}
    if stop is not None:
        def check(_pipe, _step, _timestep, tensors):
            if stop():
                raise Stopped()
            return tensors

        extra["callback_on_step_end"] = check
    with torch.no_grad():
        with gen.denoising():
            latents = gen.pipe(prompt=list(prompts), negative_prompt=[negative_prompt] * len(prompts)
                               if negative_prompt else None, num_inference_steps=steps, guidance_scale=guidance_scale,
                               generator=generators if len(generators) > 1 else generators[0], width=width,
                               height=height, output_type="latent", **extra).images
        return gen.decode(latents)
