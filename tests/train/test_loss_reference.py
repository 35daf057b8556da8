"""The trainer's loss and gradients against an independent reference written here from the papers' formulas.

Reference: plain torch + the diffusers/transformers modules, no project code. DreamBooth (Ruiz et al. 2022):
loss = MSE(instance) + lambda * MSE(class) in one batch; v-prediction (Salimans & Ho 2022): v = sqrt(abar) eps -
sqrt(1-abar) x0; min-SNR (Hang et al. 2023): weight min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR+1) for v;
offset noise: eps + offset * N(0,1) per sample and channel. Both sides get the same model and batch, and the same
noise and timesteps, handed to the step through compute_loss(noise=, timesteps=) (not through the order of random
draws). How the step draws them itself is checked on its own.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from dreambooth.config import Parameters
from dreambooth.train.step import Batch, TrainStep

from train_helpers import tiny_text_encoder, tiny_unet


def reference_loss(unet, text_encoders, alphas_cumprod, latents, ids, is_prior, prediction, noise, t, gamma, weight,
                   sdxl=False, time_ids=None):
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    if sdxl:
        out1 = text_encoders[0](ids[0], output_hidden_states=True)
        out2 = text_encoders[1](ids[1], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        cond = {"added_cond_kwargs": {"text_embeds": out2.text_embeds, "time_ids": time_ids}}
    else:
        hidden, cond = text_encoders[0](ids[0]).last_hidden_state, {}
    pred = unet(x_t, t, encoder_hidden_states=hidden, **cond).sample
    err = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma:
        snr = (abar / (1 - abar)).flatten()
        w = torch.minimum(snr, torch.full_like(snr, gamma))
        err = err * (w / snr if prediction == "epsilon" else w / (snr + 1))
    if is_prior.any():
        return err[~is_prior].mean() + weight * err[is_prior].mean()
    return err.mean()


def draws(g, latents, offset=0.0):
    """Noise (with offset noise: plus a per-sample, per-channel constant) and timesteps for a batch."""
    noise = torch.randn(latents.shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=g)
    return noise, torch.randint(0, 1000, (latents.shape[0],), generator=g)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def assert_same_gradients(ours, theirs):
    """Module by module, parameter by parameter: the same parameters got a gradient, and the same one."""
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs):
        got = {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert want, f"the reference gives {type(ref).__name__} no gradient at all"
        assert got.keys() == want.keys(), f"{type(mine).__name__}: gradients for other parameters than the reference"
        for name in want:
            assert_close(got[name], want[name])


CASES = list(itertools.product(("epsilon", "v_prediction"), (False, True), ((0.0, 0.0), (0.1, 5.0))))


@pytest.mark.parametrize("prediction,prior,extras", CASES,
                         ids=[f"{p}-{'prior' if q else 'noprior'}-{'offset+minsnr' if e[0] else 'plain'}" for p, q, e in CASES])
def test_loss_and_gradients_match_reference(prediction, prior, extras):
    from diffusers import DDPMScheduler

    offset, gamma = extras
    unet, te = tiny_unet(), tiny_text_encoder()
    ref_unet, ref_te = copy.deepcopy(unet), copy.deepcopy(te)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    params = Parameters(offset_noise=offset, min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (4, 77), generator=g),)
    is_prior = torch.tensor([False, True, False, True]) if prior else torch.zeros(4, dtype=torch.bool)

    noise, t = draws(g, latents, offset)

    step = TrainStep(unet, (te,), scheduler, params, sdxl=False)
    out = step.compute_loss(Batch(latents=latents, input_ids=ids, is_prior=is_prior), noise=noise, timesteps=t,
                            prior_loss_weight=0.7)  # the step's weight, as the run's schedule hands it in
    out.loss.backward()
    ref = reference_loss(ref_unet, (ref_te,), scheduler.alphas_cumprod, latents, ids, is_prior, prediction, noise, t,
                         gamma, 0.7)
    ref.backward()

    assert_close(out.loss, ref)
    assert_same_gradients([unet, te], [ref_unet, ref_te])
    if prior:
        assert out.prior_loss is not None and out.prior_loss > 0


def test_sdxl_conditioning_matches_reference():
    """SDXL: both encoders' penultimate states, the pooled projection and the size/crop time ids."""
    from diffusers import DDPMScheduler

    unet = tiny_unet(cross_attention_dim=32, sdxl=True)
    te1, te2 = tiny_text_encoder(seed=1), tiny_text_encoder(projection=12, seed=2)
    refs = [copy.deepcopy(m) for m in (unet, te1, te2)]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    params = Parameters()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (2, 77), generator=g), torch.randint(0, 1000, (2, 77), generator=g))
    time_ids = torch.tensor([[64.0, 80, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]])
    is_prior = torch.tensor([False, True])
    noise, t = draws(g, latents)

    step = TrainStep(unet, (te1, te2), scheduler, params, sdxl=True)
    out = step.compute_loss(Batch(latents=latents, input_ids=ids, add_time_ids=time_ids, is_prior=is_prior),
                            noise=noise, timesteps=t)
    out.loss.backward()
    ref = reference_loss(refs[0], refs[1:], scheduler.alphas_cumprod, latents, ids, is_prior, "epsilon", noise, t, 0,
                         1.0, sdxl=True, time_ids=time_ids)
    ref.backward()
    assert_close(out.loss, ref)
    assert_same_gradients([unet, te1, te2], refs)


def test_the_step_draws_offset_noise_and_timesteps():
    """Without injected draws: standard normal noise, plus offset x N(0, 1) per sample and channel; t ~ U{0, T-1}."""
    from diffusers import DDPMScheduler

    latents = torch.zeros(64, 4, 32, 32)
    torch.manual_seed(0)
    for offset in (0.0, 0.2):
        step = TrainStep(tiny_unet(), (tiny_text_encoder(),), DDPMScheduler(num_train_timesteps=1000),
                         Parameters(offset_noise=offset), sdxl=False)
        noise = step.draw_noise(latents)
        assert noise.shape == latents.shape
        # The spatial mean of each (sample, channel) plane has variance 1/(32*32) plus offset^2.
        variance = noise.mean(dim=(2, 3)).var().item()
        assert variance == pytest.approx(1 / 1024 + offset ** 2, rel=0.35)
        # Around that constant the noise is standard normal.
        assert (noise - noise.mean(dim=(2, 3), keepdim=True)).std().item() == pytest.approx(1.0, rel=0.02)
    t = step.draw_timesteps(torch.zeros(4000, 4, 1, 1))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 950


# ---------------------------------------------------------------- the newer losses, weights and noise


def reference_newer_loss(unet, te, scheduler, latents, ids, prediction, noise, t, *, loss="mse", delta=0.1,
                         schedule="constant", debiased=False, gamma=0.0, perturbation=None, strength=0.0):
    """Written from the papers: pseudo-Huber (Charbonnier; Song & Dhariwal 2023) with the SNR-scheduled delta of
    Khrapov et al. 2024, debiased estimation (Yu et al. 2024: 1/sqrt(SNR) on the epsilon loss), min-SNR, and input
    perturbation (Ning et al. 2023: x_t from eps + strength * xi, the target from eps)."""
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noised_with = noise + strength * perturbation if strength else noise
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noised_with
    target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    pred = unet(x_t, t, encoder_hidden_states=te(ids[0]).last_hidden_state).sample
    e = pred - target
    if schedule == "snr":
        sigma = ((1 - abar) / abar).sqrt()
        delta = (1 - delta) / (1 + sigma) ** 2 + delta
    if loss == "mse":
        per = e ** 2
    elif loss == "huber":
        per = 2 * delta * ((e ** 2 + delta ** 2).sqrt() - delta)
    else:
        per = 2 * ((e ** 2 + delta ** 2).sqrt() - delta)
    err = per.mean(dim=(1, 2, 3))
    snr = (abar / (1 - abar)).flatten()
    # each weight on the epsilon loss; a v loss is (SNR + 1) / SNR times the epsilon loss of the same prediction
    to_v = snr / (snr + 1) if prediction == "v_prediction" else torch.ones_like(snr)
    if gamma:
        err = err * torch.minimum(snr, torch.full_like(snr, gamma)) / snr * to_v
    if debiased:
        err = err / snr.sqrt() * to_v
    return err.mean()


NEWER = {
    "huber-constant": dict(loss_type="huber", huber_delta=0.3, huber_schedule="constant"),
    "huber-snr": dict(loss_type="huber", huber_delta=0.1, huber_schedule="snr"),
    "smooth_l1-snr": dict(loss_type="smooth_l1", huber_delta=0.2, huber_schedule="snr"),
    "debiased": dict(debiased_estimation=True),
    "debiased+minsnr": dict(debiased_estimation=True, min_snr_gamma=5.0),
    "input-perturbation": dict(input_perturbation=0.1),
}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(NEWER))
def test_newer_losses_and_weights_match_their_papers(case, prediction):
    from diffusers import DDPMScheduler

    settings = NEWER[case]
    unet, te = tiny_unet(), tiny_text_encoder()
    ref_unet, ref_te = copy.deepcopy(unet), copy.deepcopy(te)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (3, 77), generator=g),)
    noise, t = draws(g, latents)
    xi = torch.randn(latents.shape, generator=g)

    step = TrainStep(unet, (te,), scheduler, Parameters(**settings), sdxl=False)
    out = step.compute_loss(Batch(latents=latents, input_ids=ids), noise=noise, timesteps=t, perturbation=xi)
    out.loss.backward()
    ref = reference_newer_loss(
        ref_unet, ref_te, scheduler, latents, ids, prediction, noise, t, loss=settings.get("loss_type", "mse"),
        delta=settings.get("huber_delta", 0.1), schedule=settings.get("huber_schedule", "constant"),
        debiased=settings.get("debiased_estimation", False), gamma=settings.get("min_snr_gamma", 0.0),
        perturbation=xi, strength=settings.get("input_perturbation", 0.0))
    ref.backward()
    assert_close(out.loss, ref)
    assert_same_gradients([unet, te], [ref_unet, ref_te])


def test_multi_resolution_noise_is_the_pyramid_of_its_paper():
    """Whitaker 2023: noise + sum_i discount^i * upsample(N(0, 1) at 1/2^i of the size), unit std per example; the
    same draws in the same order give the same noise."""
    from diffusers import DDPMScheduler

    latents = torch.zeros(2, 4, 16, 12)
    step = TrainStep(tiny_unet(), (tiny_text_encoder(),), DDPMScheduler(num_train_timesteps=1000),
                     Parameters(multires_noise_iterations=6, multires_noise_discount=0.4), sdxl=False)
    torch.manual_seed(7)
    ours = step.draw_noise(latents)
    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    for i, size in enumerate([(8, 6), (4, 3), (2, 1)], start=1):  # 12 -> 6 -> 3 -> 1: the third level is the last
        noise = noise + 0.4 ** i * torch.nn.functional.interpolate(torch.randn(2, 4, *size), size=(16, 12),
                                                                   mode="bilinear", align_corners=False)
    reference = noise / noise.std(dim=(1, 2, 3), keepdim=True)
    assert_close(ours, reference)
    assert ours.std(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_zero_terminal_snr_rescales_as_algorithm_1_and_only_for_v_prediction():
    """Lin et al. 2023, Algorithm 1: shift sqrt(abar) so the last is 0, scale so the first is kept."""
    from diffusers import DDPMScheduler

    from dreambooth.config import Config, ConfigError, validate_for_training
    from dreambooth.train.components import training_scheduler

    base = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction")
    ours = training_scheduler(base, Parameters(zero_terminal_snr=True)).alphas_cumprod
    root = torch.cumprod(1 - base.betas.double(), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    torch.testing.assert_close(ours.double(), root ** 2, rtol=1e-5, atol=1e-9)
    assert ours[-1] == 0 and training_scheduler(base, Parameters()) is base

    data = {"concepts": [{"instance_data_dir": "."}], "parameters": {"zero_terminal_snr": True}}
    with pytest.raises(ConfigError, match="zero_terminal_snr: needs a v-prediction model; this v1 model"):
        validate_for_training(Config.from_dict({**data, "model": {"family": "v1"}}))
    validate_for_training(Config.from_dict({**data, "model": {"family": "v2-v"}}))


def test_masked_loss_is_the_mean_over_what_the_mask_keeps():
    """err_i = sum(m (pred - target)^2) / (C sum(m)); a mask of ones is the plain loss."""
    from diffusers import DDPMScheduler

    unet, te = tiny_unet(), tiny_text_encoder()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    step = TrainStep(unet, (te,), scheduler, Parameters(masked_loss=True), sdxl=False)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (2, 77), generator=g),)
    noise, t = draws(g, latents)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :4] = 1.0  # the first example learns its left half
    mask[1] = 0.5  # the second everywhere, at half weight
    with torch.no_grad():
        out = step.compute_loss(Batch(latents=latents, input_ids=ids, loss_mask=mask), noise=noise, timesteps=t).loss
        plain = step.compute_loss(Batch(latents=latents, input_ids=ids), noise=noise, timesteps=t).loss
        ones = step.compute_loss(Batch(latents=latents, input_ids=ids, loss_mask=torch.ones(2, 1, 8, 8)),
                                 noise=noise, timesteps=t).loss
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t,
                    encoder_hidden_states=te(ids[0]).last_hidden_state).sample
        squared = (pred - noise) ** 2
        first = squared[0, :, :, :4].mean()
        second = squared[1].mean()
    assert_close(out, (first + second) / 2)
    assert_close(ones, plain)
    assert not torch.isclose(out, plain)
