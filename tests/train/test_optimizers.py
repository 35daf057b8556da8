"""The packaged optimizers (Prodigy, Lion, schedule-free AdamW, CAME): each trains the tiny model, its state is saved
and restored (a run resumed half way ends with the same weights, bit for bit, as one run), and the rules around them
hold: a constant learning rate for those that find their own step size, the plain step for those that step all
parameters at once, one line naming the setting when the package is missing."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import Parameters
from dreambooth.errors import UserError
from dreambooth.train import optim, train_model
from train_helpers import draw_images, make_model, tiny_unet

PACKAGED = ["prodigy", "lion", "schedulefree_adamw", "came"]
RATES = {"prodigy": 1.0, "lion": 3e-5, "schedulefree_adamw": 1e-4, "came": 1e-4}


def unet_weights(model) -> dict:
    return load_file(model.working / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGED)
def test_a_packaged_optimizer_trains_and_resumes_bit_for_bit(name, tmp_path, tiny_source):
    # 2 images, 2 epochs, a save each epoch: the whole run and the halves save at the same steps
    settings = dict(optimizer=name, learning_rate=RATES[name], lr_scheduler="constant", train_text_encoder_ratio=0,
                    num_train_epochs=2, save_every_n_epochs=1, sample_every_n_epochs=0)
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=2)), "instance_token": "zwx",
                 "class_token": "dog", "num_samples": 0}]
    root, whole = make_model(tmp_path / "whole", tiny_source, concepts=concepts, **settings)
    before = unet_weights(whole)
    assert train_model(root, "m").ok
    root2, halves = make_model(tmp_path / "halves", tiny_source, concepts=concepts, **settings)
    assert train_model(root2, "m", max_steps=2).ok
    second = train_model(root2, "m")
    assert second.ok and second.step == 4, second.summary()
    a, b = unet_weights(whole), unet_weights(halves)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(not torch.equal(a[k], before[k]) for k in a), f"{name} did not change the weights"


def test_constant_learning_rate_and_plain_step_where_the_optimizer_needs_them():
    unet = tiny_unet()
    for name in PACKAGED:
        p = Parameters(optimizer=name, lr_scheduler="cosine", learning_rate=1e-4)
        optimizer = optim.make_optimizer(p, unet, ())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler = optim.make_lr_scheduler(p, optimizer, 100)
            fused = optim.make_fused_step(p, optimizer, list(unet.parameters()))
        said = " ".join(str(w.message) for w in caught)
        if name in ("prodigy", "schedulefree_adamw"):
            assert "constant learning rate instead of cosine" in said and fused is None
            assert "plain optimizer step" in said
            for _ in range(50):
                scheduler.step()
            assert scheduler.get_last_lr()[0] == optimizer.param_groups[0]["lr"]
        else:
            assert said == "" and fused is not None
            fused.remove()


def test_prodigy_finds_one_step_size_for_every_part_that_trains():
    from train_helpers import tiny_text_encoder

    p = Parameters(optimizer="prodigy", learning_rate=2e-6, text_encoder_learning_rate=1e-6)
    optimizer = optim.make_optimizer(p, tiny_unet(), [tiny_text_encoder()])
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
    frozen = optim.make_optimizer(Parameters(optimizer="prodigy", text_encoder_learning_rate=0), tiny_unet(),
                                  [tiny_text_encoder()])
    assert [g["lr"] for g in frozen.param_groups] == [1.0, 0.0]


def test_a_missing_package_is_one_line_naming_the_setting(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # what a missing package looks like to import
    with pytest.raises(UserError, match=r"parameters.optimizer: lion needs the lion-pytorch package.*pip install "
                                        r"lion-pytorch"):
        optim.check_optimizer_runs_here(Parameters(optimizer="lion"))


def test_schedule_free_saves_and_previews_read_its_averaged_weights():
    p = Parameters(optimizer="schedulefree_adamw", learning_rate=1e-2)
    unet = tiny_unet()
    optimizer = optim.make_optimizer(p, unet, ())
    for _ in range(3):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 16)).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = [q.detach().clone() for q in unet.parameters()]
    with optim.eval_weights(optimizer):
        averaged = [q.detach().clone() for q in unet.parameters()]
    after = [q.detach().clone() for q in unet.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(training, averaged))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(training, after))
