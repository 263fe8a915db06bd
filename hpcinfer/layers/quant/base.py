"""The method object a linear layer delegates to, and how its parameters split for TP.

A method creates the layer's parameters (``create_weights``), turns them into their run-time
form once every checkpoint tensor is in (``process_after_loading``) and computes the layer
(``apply``). Loading itself is the layer's: each parameter carries a ParamSharding that tells
the layer which of its dims follow the output and input features and how many features one
element stands for (a block, a group, eight packed 4-bit values), so one slicing rule serves
every format (hpcinfer.layers.linear).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ParamSharding:
    """How a parameter's dims map onto the layer's (output, input) features.

    ``out_dim``/``in_dim``: the dim that follows output / input features (None: not split
    along them, every rank holds all of it); ``out_per_element``/``in_per_element``: features
    per element along that dim. ``per_piece``: one entry per merged piece (q, k, v), indexed by
    the piece (per-tensor scales).
    """
    out_dim: int | None = 0
    in_dim: int | None = 1
    out_per_element: int = 1
    in_per_element: int = 1
    per_piece: bool = False


WEIGHT = ParamSharding()
BIAS = ParamSharding(out_dim=0, in_dim=None)
PER_PIECE = ParamSharding(out_dim=None, in_dim=None, per_piece=True)
REPLICATED = ParamSharding(out_dim=None, in_dim=None)


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
              sharding: ParamSharding) -> nn.Parameter:
    """Register an empty (meta or real, following the default device) parameter and note its
    sharding in ``layer.shardings`` (by name: moving a module between devices replaces its
    Parameter objects)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    layer.register_parameter(name, param)
    if "shardings" not in layer.__dict__:
        layer.shardings = {}
    layer.shardings[name] = sharding
    return param


def replace_weight(layer: nn.Module, weight: torch.Tensor, drop: tuple[str, ...]) -> None:
    """Swap the checkpoint's parameters ``drop`` for one plain ``weight`` [out, in]."""
    for name in drop:
        if name in layer._parameters:
            del layer._parameters[name]
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.shardings["weight"] = WEIGHT


class QuantMethod:
    """Interface of a linear layer's weight method. ``layer`` is a hpcinfer LinearBase: it
    has ``input_size``/``output_size`` (this rank's), ``out_pieces`` (this rank's output
    features of each merged piece) and ``params_dtype`` (the compute dtype)."""

    name = "base"

    def create_weights(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def process_after_loading(self, layer: nn.Module) -> None:
        """Called once after the loader filled every parameter."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        raise NotImplementedError

    def dummy_weights(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Fill the layer's parameters with random values in this method's own layout
        (``load_format="dummy"``, hpcinfer.models.loader.load_dummy_weights), so that
        ``process_after_loading`` sees what a checkpoint would give it. Default: every
        floating-point parameter uniform in +-dummy_range(layer)."""
        for name in layer.shardings:
            param = layer._parameters.get(name)
            if param is not None:
                uniform_(param.data, dummy_range(layer), gen)


def dummy_range(layer: nn.Module) -> float:
    """Half-width of a dummy weight's uniform values: 1/sqrt(fan_in) of the whole layer (a
    row-parallel rank's slice uses the full input size), so activations keep their scale
    through every layer and bf16 stays finite."""
    fan_in = getattr(layer, "full_input_size", None) or layer.input_size
    return float(fan_in) ** -0.5


def uniform_(t: torch.Tensor, r: float, gen: torch.Generator) -> torch.Tensor:
    """``t`` (any float dtype, fp8 included) filled in place with U(-r, r) drawn by ``gen``
    in fp32 on t's device."""
    values = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    values.uniform_(-r, r, generator=gen)
    t.copy_(values)
    return t


def random_words(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` (int32) filled in place with random 32-bit words: eight uniform 4-bit codes each."""
    t.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, t.shape, dtype=torch.int32, device=t.device,
                          generator=gen))
    return t


class UnquantizedMethod(QuantMethod):
    """A plain ``weight`` [out, in] in the compute dtype: y = x W^T + b."""

    name = "unquantized"

    def create_weights(self, layer: nn.Module) -> None:
        add_param(layer, "weight", (layer.output_size, layer.input_size), layer.params_dtype,
                  WEIGHT)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedMethod()
