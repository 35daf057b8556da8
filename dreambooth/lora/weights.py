"""The adapters of a model as plain tensors, and peft adapters put on (and read back from) the model's modules.

Three kinds, each trained by peft and written under the names the LyCORIS file format gives them (which the webui's
built-in Lora extension, Forge and ComfyUI read):

  lora  (alpha / rank) x up @ down. For a Linear layer down is (rank, in) and up (out, rank); for a convolution down
        is a convolution of the layer's kernel size (rank, in, kh, kw) and up a 1x1 one (out, rank, 1, 1): kohya's
        `lora_down.weight` / `lora_up.weight`.
  loha  (alpha / rank) x (w1_a @ w1_b) * (w2_a @ w2_b), an element-wise (Hadamard) product of two low-rank pairs,
        each a (out, rank) and a (rank, in x kh x kw) matrix: `hada_w1_a` ... `hada_w2_b`.
  lokr  (alpha / rank) x kron(w1, w2), a Kronecker product whose factors are full matrices or low-rank pairs
        (`lokr_w1` or `lokr_w1_a` @ `lokr_w1_b`, the same for w2; a convolution's full w2 keeps its kernel).
        Loaders scale by alpha / rank only where a factor is a low-rank pair (they read the rank from it); with both
        factors full they apply kron(w1, w2) as it is, so such a file carries the scale inside w1.
  dora  a LoRA renormalised per input column with a trained magnitude `dora_scale` (dora.py). The webui keeps an
        OpenCLIP text encoder's attention as one fused layer, to which it cannot apply a magnitude: those four
        projections stay plain LoRA adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ADAPTER_TYPES
from ..errors import UserError
from . import dora
from .keys import is_attention, target_modules

ADAPTER = "default"  # peft's adapter name
# The names of each kind's trained tensors: peft's parameter names are the file's (LoRA's are kohya's lora_down/up).
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
PEFT_PARAMETERS = (".lora_A.", ".lora_B.", ".hada_", ".lokr_", f".{dora.MAGNITUDE}")


@dataclass
class Adapter:
    """A LoRA adapter, or a DoRA one with its magnitude."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "lora" if self.magnitude is None else "dora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a file stores for this adapter (besides alpha), by their name in the file."""
        extra = {} if self.magnitude is None else {dora.MAGNITUDE: self.magnitude}
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, **extra}

    def delta(self) -> torch.Tensor:
        """The low-rank change to the module's weight, in the weight's shape (float32)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The module's weight with this adapter applied (float32)."""
        changed = weight.float() + self.delta()
        return changed if self.magnitude is None else dora.renormalised(changed, self.magnitude.float())


@dataclass
class Lycoris:
    """A LoHa or LoKr adapter: its factors by their LyCORIS names, alpha, the rank it was made with, and the shape of
    the weight it changes."""

    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float
    rank: int
    shape: tuple

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.kind == "lokr" and "lokr_w1_b" not in self.factors and "lokr_w2_b" not in self.factors:
            return {**self.factors, "lokr_w1": self.factors["lokr_w1"] * self.scale}  # loaders apply no scale here
        return dict(self.factors)

    def delta(self) -> torch.Tensor:
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "loha":
            product = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            product = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
        return (product * self.scale).reshape(self.shape)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self.delta()


# part ("unet", "text_encoder", "text_encoder_2") -> module name (diffusers / transformers) -> adapter
LoraWeights = dict


def layer_width(module: torch.nn.Module) -> int:
    """The largest rank an adapter of this layer can use: min(outputs, inputs x kernel area)."""
    weight = module.weight
    return int(min(weight.shape[0], weight[0].numel()))


def check_rank(setting: str, rank: int, model: torch.nn.Module, names: list[str]) -> None:
    """A rank of 0, or above the narrowest adapted layer's width, is a UserError naming the setting."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"{setting}: must be a whole number of at least 1, got {rank!r}")
    if not names:
        raise UserError(f"{setting}: this model has no layers to adapt")
    modules = dict(model.named_modules())
    width, name = min((layer_width(modules[n]), n) for n in names)
    if rank > width:
        raise UserError(f"{setting}: {rank} is above the width {width} of the narrowest layer it adapts ({name}); "
                        f"use at most {width}")


def attach_adapters(model: torch.nn.Module, part: str, rank: int, alpha: float, layers: str,
                    dropout: float = 0.0, setting: str = "rank", kind: str = "lora",
                    fused_attention: bool = False) -> list[str]:
    """Put fresh peft adapters of `kind` (lora, loha, lokr, dora) on the target layers of `model` (in place); returns
    the adapted module names. `fused_attention`: the webui keeps this text encoder's attention as one layer (OpenCLIP),
    so DoRA leaves its projections plain LoRA.

    Fresh adapters change nothing (one factor starts at zero); only their parameters should be trained.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    names = target_modules(part, model, layers)
    check_rank(setting, rank, model, names)
    if not alpha > 0:
        raise UserError(f"{setting.replace('rank', 'alpha')}: must be above 0, got {alpha!r}")
    if kind in ("lora", "dora"):
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    elif kind == "loha":  # no input dropout in peft's LyCORIS layers: rank dropout drops rows of the change
        config = LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=names)
    elif kind == "lokr":
        config = LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=names)
    else:
        raise UserError(f"lora_type: one of {', '.join(ADAPTER_TYPES)}, got {kind!r}")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if kind == "dora":
        layers = adapter_layers(model)
        dora.add_magnitudes(layers[n] for n in names if not (fused_attention and is_attention(part, n)))
    if kind == "lokr" and not _lokr_delta_is_scaled():
        for layer in adapter_layers(model).values():
            _scale_lokr_delta(layer)
    return names


def _lokr_delta_is_scaled() -> bool:
    """Does this peft scale a LoKr delta by alpha / rank? peft before 0.14 (the one that runs with the webui 1.10's
    transformers) leaves the scale out of LoKr, though it keeps it in `scaling`."""
    from peft import LoKrConfig, inject_adapter_in_model

    probe = inject_adapter_in_model(LoKrConfig(r=1, alpha=2, target_modules=["0"]), torch.nn.Sequential(
        torch.nn.Linear(4, 4)), adapter_name=ADAPTER)[0]
    with torch.no_grad():
        for p in layer_factors(probe).values():
            p.fill_(1.0)
        return bool(probe.get_delta_weight(ADAPTER).flatten()[0] == 2.0)


def _scale_lokr_delta(layer) -> None:
    """Make a LoKr layer of such a peft apply its `scaling`, as later peft does: the trained model then is what the
    file says (alpha / rank), and the preview weight works."""
    unscaled = layer.get_delta_weight

    def get_delta_weight(adapter_name, *args, **kwargs):
        return unscaled(adapter_name, *args, **kwargs) * layer.scaling[adapter_name]

    layer.get_delta_weight = get_delta_weight


def adapter_layers(model: torch.nn.Module) -> dict:
    """{module name: peft layer} of the modules of `model` that carry our adapter (any kind)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "scaling", {})}


def layer_kind(layer) -> str:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    if isinstance(layer, (LoHaLayer, LoKrLayer)):
        return "loha" if isinstance(layer, LoHaLayer) else "lokr"
    return "dora" if hasattr(layer, dora.MAGNITUDE) else "lora"


def layer_factors(layer) -> dict[str, torch.nn.Parameter]:
    """The trained tensors of a peft layer by their file names (see the module doc)."""
    kind = layer_kind(layer)
    if kind in ("lora", "dora"):
        magnitude = {dora.MAGNITUDE: getattr(layer, dora.MAGNITUDE)} if kind == "dora" else {}
        return {"lora_down.weight": layer.lora_A[ADAPTER].weight, "lora_up.weight": layer.lora_B[ADAPTER].weight,
                **magnitude}
    return {k: getattr(layer, k)[ADAPTER] for k in (HADA if kind == "loha" else LOKR) if ADAPTER in getattr(layer, k)}


def adapters_of(model: torch.nn.Module) -> dict:
    """The peft adapters on `model`'s modules, by module name (copies on the CPU): Adapter or Lycoris."""
    found = {}
    for name, layer in adapter_layers(model).items():
        kind, rank = layer_kind(layer), layer.r[ADAPTER]
        alpha = float(layer.scaling[ADAPTER]) * rank
        factors = {k: p.detach().to("cpu", copy=True) for k, p in layer_factors(layer).items()}
        if kind in ("lora", "dora"):
            found[name] = Adapter(down=factors["lora_down.weight"], up=factors["lora_up.weight"], alpha=alpha,
                                  magnitude=factors.get(dora.MAGNITUDE))
        else:
            found[name] = Lycoris(kind, factors, alpha, rank, tuple(layer.get_base_layer().weight.shape))
    return found


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters of `model` (what the optimizer should see)."""
    return [p for n, p in model.named_parameters() if any(k in n for k in PEFT_PARAMETERS)]
