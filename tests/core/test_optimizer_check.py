"""A setting this machine cannot run is said before any model loads: the 8-bit AdamW of a bitsandbytes without CPU
support (0.42 asserts "Torch not compiled with CUDA enabled" at its first step) is named with the alternative, and a
training then uses that alternative (AdamW) instead of stopping."""
import sys
import types

import pytest
import torch

from dreambooth.config import Concept, Config, Parameters
from dreambooth.errors import UserError
from dreambooth.store import DataRoot
from dreambooth.train import loop
from dreambooth.train.optim import check_optimizer_runs_here


def fake_bitsandbytes(monkeypatch, step, version="0.42.0"):
    """A bitsandbytes whose AdamW8bit.step does `step(params)`."""
    class AdamW8bit:
        def __init__(self, groups, **kwargs):
            self.params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]

        def step(self):
            step(self.params)

    module = types.ModuleType("bitsandbytes")
    module.__version__ = version
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)


def cuda_assert(params):
    raise AssertionError("Torch not compiled with CUDA enabled")


def test_other_optimizers_need_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable
    check_optimizer_runs_here(Parameters(optimizer="adamw"))
    check_optimizer_runs_here(Parameters(optimizer="adafactor"))


def test_missing_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="parameters.optimizer: adamw_8bit needs bitsandbytes, which is not installed"):
        check_optimizer_runs_here(Parameters(optimizer="adamw_8bit"))


@pytest.mark.parametrize("step,words", [
    (cuda_assert, "AssertionError: Torch not compiled with CUDA enabled"),
    (lambda p: (_ for _ in ()).throw(RuntimeError("All input tensors need to be on the same GPU,\nbut ...")),
     "RuntimeError: All input tensors need to be on the same GPU,"),
    (lambda p: (_ for _ in ()).throw(NameError("name 'str2optimizer8bit_blockwise' is not defined")), "NameError"),
    (lambda p: None, "its step did not change the weights"),
])
def test_an_8bit_adamw_that_cannot_step_here_is_named(monkeypatch, step, words):
    fake_bitsandbytes(monkeypatch, step)
    with pytest.raises(UserError) as e:
        check_optimizer_runs_here(Parameters(optimizer="adamw_8bit"), device="cpu")
    message = str(e.value)
    assert message.startswith("parameters.optimizer: adamw_8bit cannot run on a CPU")
    assert "bitsandbytes 0.42.0" in message and words in message and "choose adamw" in message
    assert "\n" not in message


@pytest.mark.slow  # importing bitsandbytes takes seconds
def test_the_installed_bitsandbytes_on_this_machine():
    """The real package: it either steps here, or the check says so (never a traceback at the first step)."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        check_optimizer_runs_here(Parameters(optimizer="adamw_8bit"))
    except UserError as e:
        assert "adamw_8bit cannot run" in str(e) and bnb.__version__ in str(e)
    else:  # it ran: then a real step on the CPU works too
        p = torch.nn.Parameter(torch.zeros(4096))
        p.grad = torch.ones(4096)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        assert float(p[0]) < 0


def test_train_falls_back_to_adamw_where_8bit_adamw_cannot_run(monkeypatch, tmp_path):
    """The default optimizer on a machine where it cannot step (SD.Next on a CPU gets bitsandbytes 0.42): the run
    uses AdamW, said once before any model loads; the config keeps its choice for a machine where it runs."""
    fake_bitsandbytes(monkeypatch, cuda_assert)
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    images = tmp_path / "images"
    images.mkdir()
    root = DataRoot(tmp_path / "root").ensure()
    model = root.model("m")
    model.path.mkdir(parents=True)
    Config(concepts=(Concept(instance_data_dir=str(images)),),
           parameters=Parameters(optimizer="adamw_8bit")).save(model.config_path)
    started = []

    class Started:
        def __init__(self, root, model, config, max_steps):
            started.append(config.parameters.optimizer)

        def run(self):
            return "ran"

    monkeypatch.setattr(loop, "Trainer", Started)
    with pytest.warns(UserWarning, match=r"adamw_8bit cannot run on a CPU .*: this run uses adamw instead") as said:
        assert loop.train_model(root, "m") == "ran"
    assert started == ["adamw"] and len(said) == 1
    assert Config.load(model.config_path).parameters.optimizer == "adamw_8bit"
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # another optimizer that cannot run is still refused
    with pytest.raises(UserError, match="lion needs the lion-pytorch package"):
        loop.train_model(root, "m", overrides={"optimizer": "lion"})
