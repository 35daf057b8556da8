"""The trainer's loss and gradients against an independent reference written here from the papers' formulas.

Reference: plain torch + the diffusers/transformers modules, no project code. DreamBooth (Ruiz et al. 2022):
loss = MSE(instance) + lambda * MSE(class) in one batch; v-prediction (Salimans & Ho 2022): v = sqrt(abar) eps -
sqrt(1-abar) x0; min-SNR (Hang et al. 2023): weight min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR+1) for v;
offset noise: eps + offset * N(0,1) per sample and channel. Both sides get the same model, batch, and random draws.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from dreambooth.config import Parameters
from dreambooth.train.step import Batch, TrainStep

from train_helpers import tiny_text_encoder, tiny_unet


def reference_loss(unet, text_encoders, alphas_cumprod, latents, ids, is_prior, prediction, offset, gamma, weight,
                   seed, sdxl=False, time_ids=None):
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],))
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


def grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


CASES = list(itertools.product(("epsilon", "v_prediction"), (False, True), ((0.0, 0.0), (0.1, 5.0))))


@pytest.mark.parametrize("prediction,prior,extras", CASES,
                         ids=[f"{p}-{'prior' if q else 'noprior'}-{'offset+minsnr' if e[0] else 'plain'}" for p, q, e in CASES])
def test_loss_and_gradients_match_reference(prediction, prior, extras):
    from diffusers import DDPMScheduler

    offset, gamma = extras
    unet, te = tiny_unet(), tiny_text_encoder()
    ref_unet, ref_te = copy.deepcopy(unet), copy.deepcopy(te)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    params = Parameters(offset_noise=offset, min_snr_gamma=gamma, prior_loss_weight=0.7)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (4, 77), generator=g),)
    is_prior = torch.tensor([False, True, False, True]) if prior else torch.zeros(4, dtype=torch.bool)

    step = TrainStep(unet, (te,), scheduler, params, sdxl=False)
    torch.manual_seed(11)
    out = step.compute_loss(Batch(latents=latents, input_ids=ids, is_prior=is_prior))
    out.loss.backward()
    ref = reference_loss(ref_unet, (ref_te,), scheduler.alphas_cumprod, latents, ids, is_prior, prediction, offset,
                         gamma, 0.7, seed=11)
    ref.backward()

    assert_close(out.loss, ref)
    ours, theirs = grads([unet, te]), grads([ref_unet, ref_te])
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert_close(a, b)
    if prior:
        assert out.prior_loss is not None and out.prior_loss > 0


def test_sdxl_conditioning_matches_reference():
    """SDXL: both encoders' penultimate states, the pooled projection and the size/crop time ids."""
    from diffusers import DDPMScheduler

    unet = tiny_unet(cross_attention_dim=32, sdxl=True)
    te1, te2 = tiny_text_encoder(seed=1), tiny_text_encoder(projection=12, seed=2)
    refs = [copy.deepcopy(m) for m in (unet, te1, te2)]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    params = Parameters(prior_loss_weight=1.0)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = (torch.randint(0, 1000, (2, 77), generator=g), torch.randint(0, 1000, (2, 77), generator=g))
    time_ids = torch.tensor([[64.0, 80, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]])
    is_prior = torch.tensor([False, True])

    step = TrainStep(unet, (te1, te2), scheduler, params, sdxl=True)
    torch.manual_seed(4)
    out = step.compute_loss(Batch(latents=latents, input_ids=ids, add_time_ids=time_ids, is_prior=is_prior))
    out.loss.backward()
    ref = reference_loss(refs[0], refs[1:], scheduler.alphas_cumprod, latents, ids, is_prior, "epsilon", 0, 0, 1.0,
                         seed=4, sdxl=True, time_ids=time_ids)
    ref.backward()
    assert_close(out.loss, ref)
    for a, b in zip(grads([unet, te1, te2]), grads(refs)):
        assert_close(a, b)
