"""One DreamBooth training step as a reusable unit: forward, loss, backward, optimizer step.

The trainer (train/loop.py) runs exactly this; the benchmarks time exactly this. Build it from in-memory modules:

    step = TrainStep(unet, (text_encoder,), noise_scheduler, params, sdxl=False,
                     vae=vae, optimizer=opt, lr_scheduler=sched, accelerator=accelerator)
    loss = step(batch, train_text_encoder=True, prior_loss_weight=w)   # forward, loss, backward, clip, step
    out = step.compute_loss(batch, noise=n, timesteps=t, prior_loss_weight=w)   # forward + loss only

(tests inject noise and timesteps). The class loss's weight `w` is handed in per step: the run's schedule decides it
(schedule.Schedule.prior_loss_weight(step)); 1.0 when not given.

`Batch` fields (tensors on the training device; B = batch size, instance and class examples mixed):
  latents        (B, 4, h, w) VAE latents already multiplied by vae.config.scaling_factor; or None and then
  pixels         (B, 3, H, W) images in [-1, 1], encoded with `vae` inside the step (needs vae=...)
  input_ids      tuple with one (B, 77) LongTensor per tokenizer (1 for v1/v2, 2 for SDXL); or, when the text
                 encoders are frozen and their outputs cached:
  prompt_embeds  (B, 77, D) encoder hidden states and, for SDXL, pooled_embeds (B, D2)
  add_time_ids   (B, 6) SDXL size/crop conditioning: original (h, w), crop top-left (top, left), target (h, w)
  is_prior       (B,) bool, True for class (prior-preservation) examples; None = all instance examples. Best kept
                 on the CPU (the trainer does): the step counts it there, without waiting for the GPU
  loss_mask      (B, 1, h, w) in [0, 1] at latent resolution, or None: where each example is learnt (masked_loss)

The loss (DreamBooth paper, Ruiz et al. 2022, with the usual extras; SNR_t = abar_t / (1 - abar_t)):
  noise   = N(0, 1) (+ offset_noise * N(0, 1) per sample and channel, broadcast over h, w)
            (then, with multires_noise_iterations = n: pyramid_noise(noise, n, discount), below)
  x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) (noise + input_perturbation * N(0, 1)), t ~ U{0, T-1}
            (input perturbation, Ning et al. 2023: the input is noised with perturbed noise, the target is not)
  target  = noise (epsilon models) or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (v-prediction models)
  e       = unet(x_t, t, text) - target
  err_i   = mean over (c, h, w) (with a loss mask m: sum(m l) / sum(m), the mean over what the mask keeps) of l =, by
            loss_type:
              mse        e^2
              huber      2 c (sqrt(e^2 + c^2) - c)        (pseudo-Huber; Charbonnier 1994, Song & Dhariwal 2023)
              smooth_l1  2 (sqrt(e^2 + c^2) - c)
            c = huber_delta (constant), or with huber_schedule "snr" (Khrapov et al. 2024):
            c_t = (1 - huber_delta) / (1 + sigma_t)^2 + huber_delta, sigma_t = sqrt((1 - abar_t) / abar_t)
  w_i     = product of the weights that are on, each written on the epsilon loss and carried to a v loss, whose
            epsilon loss is SNR_t / (SNR_t + 1) times the v loss:
              min_snr_gamma > 0 (Hang et al. 2023)       min(SNR_t, gamma) / SNR_t  (v: min(SNR_t, gamma) / (SNR_t + 1))
              debiased_estimation (Yu et al. 2024)      1 / sqrt(SNR_t)            (v: sqrt(SNR_t) / (SNR_t + 1))
  loss    = mean_{instance}(w_i err_i) + prior_loss_weight * mean_{class}(w_i err_i)   (the step's weight)
(A batch without class examples is just the instance mean.) With zero_terminal_snr the noise scheduler's betas are
rescaled first (components.training_scheduler).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    input_ids: tuple = ()
    prompt_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None
    is_prior: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    def to(self, device, dtype=None) -> "Batch":
        def move(t):
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)
        return Batch(
            latents=move(self.latents), pixels=move(self.pixels),
            input_ids=tuple(i.to(device) for i in self.input_ids),
            prompt_embeds=move(self.prompt_embeds), pooled_embeds=move(self.pooled_embeds),
            add_time_ids=move(self.add_time_ids), is_prior=self.is_prior, loss_mask=move(self.loss_mask),
        )

    def __len__(self) -> int:
        for t in (self.latents, self.pixels, self.prompt_embeds):
            if t is not None:
                return t.shape[0]
        return self.input_ids[0].shape[0]


@dataclass
class LossOutput:
    loss: torch.Tensor            # what is backpropagated
    instance_loss: torch.Tensor   # weighted mean over instance examples (detached)
    prior_loss: torch.Tensor | None  # weighted mean over class examples (detached), None without any


def encode_prompt(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor], sdxl: bool):
    """Text conditioning as Stable Diffusion uses it. Returns (hidden states, pooled or None).

    v1/v2: the text encoder's last hidden state (v2's converted encoder already ends at the penultimate layer).
    SDXL: both encoders' penultimate hidden states concatenated; pooled = the second encoder's projected output.
    """
    if not sdxl:
        return text_encoders[0](input_ids[0])[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder (CLIPTextModelWithProjection) gives text_embeds first
    return torch.cat(hidden, dim=-1), pooled


def frozen_prompt_embedding(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor], sdxl: bool):
    """One prompt's conditioning from frozen text encoders (`input_ids`: one (1, 77) tensor per tokenizer), without
    the batch dimension: (hidden states, pooled or None), what the trainer computes once per prompt and reuses."""
    with torch.no_grad():
        hidden, pooled = encode_prompt(text_encoders, input_ids, sdxl)
    return hidden[0], None if pooled is None else pooled[0]


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def pyramid_noise(noise: torch.Tensor, levels: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023, "Multi-resolution noise for diffusion model training"): noise plus
    discount^i times N(0, 1) drawn at 1/2^i of the size and upsampled (bilinear), for i = 1..levels or until a side is
    1; rescaled to unit standard deviation per example."""
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(1, levels + 1):
        low_h, low_w = max(1, h >> i), max(1, w >> i)
        low = torch.randn(b, c, low_h, low_w, device=noise.device, dtype=torch.float32)
        out = out + discount ** i * F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        if low_h == 1 or low_w == 1:
            break
    return (out / out.std(dim=(1, 2, 3), keepdim=True)).to(noise.dtype)


def element_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, delta) -> torch.Tensor:
    """The per-element loss of the step's docstring (`delta`: a number or a (B, 1, 1, 1) tensor)."""
    error = pred.float() - target.float()
    if loss_type == "mse":
        return error ** 2
    soft = torch.sqrt(error ** 2 + delta ** 2) - delta
    return 2 * delta * soft if loss_type == "huber" else 2 * soft


def _accumulate(accelerator, models):
    """accelerator.accumulate over all trained models (a no-op context without an accelerator)."""
    if accelerator is None:
        return contextlib.nullcontext()
    try:
        return accelerator.accumulate(*models)
    except TypeError:
        # accelerate < 0.23 (the webui 1.10 ships 0.21) takes one model: the others then sync their gradients on
        # every micro-batch under DDP, which costs communication but gives the same result.
        return accelerator.accumulate(models[0])


class TrainStep:
    def __init__(self, unet, text_encoders: Sequence[torch.nn.Module], noise_scheduler, params, sdxl: bool,
                 prediction_type: str | None = None, vae=None, optimizer=None, lr_scheduler=None,
                 accelerator=None, trainable_params: Sequence[torch.nn.Parameter] | None = None,
                 fused=None, pure_bf16: bool = False, autocast_dtype: torch.dtype | None = None):
        self.unet = unet
        self.text_encoders = tuple(text_encoders)
        self.noise_scheduler = noise_scheduler
        self.params = params
        self.sdxl = sdxl
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        self.vae = vae
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.accelerator = accelerator
        self.trainable_params = list(trainable_params) if trainable_params is not None else None
        self.fused = fused  # optim.FusedBackwardStep: parameters are stepped during backward
        self.pure_bf16 = pure_bf16  # weights held in bf16: updated in fp32, written back with stochastic rounding
        self.autocast_dtype = autocast_dtype  # the mixed precision (precision.DtypePlan.autocast); None: none

    # -- pieces ----------------------------------------------------------------------------------------------
    def latents_of(self, batch: Batch) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents
        if self.vae is None:
            raise ValueError("batch has pixels but the step has no VAE")
        with torch.no_grad():
            latents = self.vae.encode(batch.pixels.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def conditioning(self, batch: Batch):
        if batch.prompt_embeds is not None:
            return batch.prompt_embeds, batch.pooled_embeds
        return encode_prompt(self.text_encoders, batch.input_ids, self.sdxl)

    def draw_noise(self, latents: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(latents)
        if self.params.offset_noise > 0:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
            noise = noise + self.params.offset_noise * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype)
        if self.params.multires_noise_iterations > 0:
            noise = pyramid_noise(noise, self.params.multires_noise_iterations, self.params.multires_noise_discount)
        return noise

    def draw_timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                             device=latents.device).long()

    # -- the loss --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Batch, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                     prior_loss_weight: float = 1.0, perturbation: torch.Tensor | None = None) -> LossOutput:
        p = self.params
        latents = self.latents_of(batch)
        if noise is None:
            noise = self.draw_noise(latents)
        if timesteps is None:
            timesteps = self.draw_timesteps(latents)
        noised_with = noise
        if p.input_perturbation > 0:
            perturbation = torch.randn_like(noise) if perturbation is None else perturbation
            noised_with = noise + p.input_perturbation * perturbation
        noisy = self.noise_scheduler.add_noise(latents, noised_with, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)

        hidden, pooled = self.conditioning(batch)
        extra = {}
        if self.sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch.add_time_ids}
        pred = self.unet(noisy, timesteps, hidden, **extra).sample

        elements = element_loss(pred, target, p.loss_type, self.huber_delta(timesteps))
        if batch.loss_mask is None:
            per_example = elements.mean(dim=(1, 2, 3))
        else:  # the mean over what the mask keeps: a masked image weighs as much as a whole one
            mask = batch.loss_mask.float()
            kept = (mask.sum(dim=(1, 2, 3)) * elements.shape[1]).clamp(min=1e-6)  # a crop may keep nothing: loss 0
            per_example = (elements * mask).sum(dim=(1, 2, 3)) / kept
        per_example = per_example * self.timestep_weight(timesteps)

        is_prior = batch.is_prior
        priors = 0 if is_prior is None else int(is_prior.sum())
        if priors == 0:
            loss = per_example.mean()
            return LossOutput(loss, loss.detach(), None)
        # Masked sums rather than boolean indexing: no host sync on a GPU.
        mask = is_prior.to(per_example.device, non_blocking=True)
        instances = len(is_prior) - priors
        zero = per_example.new_zeros(())
        instance = torch.where(mask, zero, per_example).sum() / instances if instances else zero
        prior = torch.where(mask, per_example, zero).sum() / priors
        loss = instance + prior_loss_weight * prior
        return LossOutput(loss, instance.detach(), prior.detach())

    def huber_delta(self, timesteps: torch.Tensor):
        """The pseudo-Huber c: the setting, or with the "snr" schedule per example (see the module's doc)."""
        p = self.params
        if p.loss_type == "mse" or p.huber_schedule == "constant":
            return p.huber_delta
        sigma = snr(self.noise_scheduler, timesteps).clamp(min=1e-12).rsqrt()
        return ((1 - p.huber_delta) / (1 + sigma) ** 2 + p.huber_delta).view(-1, 1, 1, 1)

    def timestep_weight(self, timesteps: torch.Tensor):
        """w_t of the module's doc: min-SNR and debiased estimation, as set (1 when neither is on)."""
        p = self.params
        if p.min_snr_gamma <= 0 and not p.debiased_estimation:
            return 1.0
        s = snr(self.noise_scheduler, timesteps)
        v = self.prediction_type == "v_prediction"
        weight = torch.ones_like(s)
        if p.min_snr_gamma > 0:
            clipped = torch.clamp(s, max=p.min_snr_gamma)
            weight = weight * (clipped / (s + 1) if v else clipped / s)
        if p.debiased_estimation:
            weight = weight * (s.sqrt() / (s + 1) if v else s.clamp(min=1e-12).rsqrt())
        return weight

    # -- the whole step --------------------------------------------------------------------------------------
    def __call__(self, batch: Batch, train_text_encoder: bool = True, prior_loss_weight: float = 1.0) -> LossOutput:
        """Forward + loss + backward, then (when an optimizer is given and gradients are synced) clip and step.

        With an accelerator this honours gradient accumulation (accelerator.accumulate) and mixed precision.
        When train_text_encoder is False the text encoders run without gradients. A compiled UNet whose compiler
        fails (at its first forward or backward, before any weight has a gradient) goes back to eager, with one
        warning, and the step runs again.
        """
        from .components import is_compiled, uncompile

        unet = getattr(self.unet, "module", self.unet)  # under DDP, the model itself
        try:
            return self._step(batch, train_text_encoder, prior_loss_weight)
        except Exception as e:
            if not is_compiled(unet) or not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            import warnings

            cause = getattr(e, "inner_exception", None) or e  # the compiler's own error, inside dynamo's
            reason = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
            warnings.warn(f"compile_unet: compiling the UNet failed ({type(cause).__name__}: {reason}); training "
                          "without compiling", stacklevel=2)
            uncompile(unet)
            if self.fused is not None:
                self.fused.discard()
            for model in (self.unet, *self.text_encoders):
                for p in model.parameters():
                    p.grad = None
            return self._step(batch, train_text_encoder, prior_loss_weight)

    def _step(self, batch: Batch, train_text_encoder: bool, prior_loss_weight: float) -> LossOutput:
        acc = self.accelerator
        models = [self.unet, *self.text_encoders] if train_text_encoder else [self.unet]
        with _accumulate(acc, models):
            if not train_text_encoder and batch.prompt_embeds is None and batch.input_ids:
                with torch.no_grad():
                    hidden, pooled = encode_prompt(self.text_encoders, batch.input_ids, self.sdxl)
                batch = Batch(latents=batch.latents, pixels=batch.pixels, prompt_embeds=hidden.detach(),
                              pooled_embeds=None if pooled is None else pooled.detach(),
                              add_time_ids=batch.add_time_ids, is_prior=batch.is_prior, loss_mask=batch.loss_mask)
            with self.autocast():
                out = self.compute_loss(batch, prior_loss_weight=prior_loss_weight)
            if acc is not None:
                acc.backward(out.loss)
            else:
                out.loss.backward()
            synced = acc.sync_gradients if acc is not None else True
            if self.optimizer is not None and synced:
                if self.fused is not None:
                    self.fused.finish_step()  # the parameters were clipped and stepped as their gradients arrived
                else:
                    self.plain_optimizer_step(models)
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()  # after the optimizer step, on both paths
        return out

    def autocast(self):
        """The forward pass in the run's mixed precision, on the models' device (whatever accelerate thinks of it)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.unet.parameters()).device.type, dtype=self.autocast_dtype)

    def plain_optimizer_step(self, models) -> None:
        """Clip by the global norm, step every parameter, clear the gradients."""
        acc = self.accelerator
        params = self.trainable_params
        if params is None:
            params = [p for m in models for p in m.parameters() if p.requires_grad]
        if self.params.max_grad_norm > 0:
            if acc is not None:
                acc.clip_grad_norm_(params, self.params.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.params.max_grad_norm)
        if self.pure_bf16:
            from .optim import plain_step_pure_bf16

            plain_step_pure_bf16(self.optimizer, params)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


__all__ = ["Batch", "LossOutput", "TrainStep", "encode_prompt", "frozen_prompt_embedding", "snr"]
