"""Poolers: one vector per sequence from the hidden states of its tokens.

``PoolingConfig`` says how (CLS, MEAN or LAST token; L2-normalize or not). It comes from
the checkpoint's sentence-transformers files when they are there (``modules.json`` lists a
``Pooling`` module whose ``config.json`` sets ``pooling_mode_*``; a ``Normalize`` module
means normalize), else from the model class's default, as vLLM does. ``Dense``
modules (a linear layer and an activation each, e.g. LaBSE) run after pooling, before
normalizing. ``dimensions`` (Matryoshka) truncates before normalizing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_TYPES = ("CLS", "MEAN", "LAST")

# sentence-transformers' 1_Pooling/config.json key -> our pooling type
_ST_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
             "pooling_mode_lasttoken": "LAST"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    pooling_type: str = "LAST"   # CLS | MEAN | LAST
    normalize: bool = True
    max_seq_length: int | None = None   # sentence_bert_config.json: inputs longer are refused
    source: str = "default"
    dense_dirs: tuple[str, ...] = ()    # sentence-transformers Dense modules, in order

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r}: use one of "
                             f"{list(POOLING_TYPES)}")


def read_pooling_config(model_dir: str | Path, default_type: str) -> PoolingConfig:
    """The pooling of a checkpoint: its sentence-transformers files if present, else
    ``default_type`` with normalization (vLLM's defaults)."""
    model_dir = Path(model_dir)
    modules_path = model_dir / "modules.json"
    max_len = _max_seq_length(model_dir)
    if not modules_path.is_file():
        return PoolingConfig(default_type, True, max_len)
    modules = json.loads(modules_path.read_text())
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(types) - {"Transformer", "Pooling", "Dense", "Normalize"})
    if unsupported:
        raise ValueError(f"{modules_path} lists sentence-transformers module(s) {unsupported} "
                         "that hpcinfer does not run yet (it runs Transformer, Pooling, Dense "
                         "and Normalize); use a checkpoint without them")
    dense = tuple(str(model_dir / m["path"]) for m in modules
                  if m.get("type", "").endswith(".Dense"))
    pooling_type = default_type
    if "Pooling" in types:
        pooling_type = _st_pooling_type(model_dir / types["Pooling"].get("path", "1_Pooling")
                                        / "config.json")
    return PoolingConfig(pooling_type, "Normalize" in types, max_len, str(modules_path), dense)


def _st_pooling_type(path: Path) -> str:
    config = json.loads(path.read_text())
    mode = config.get("pooling_mode")
    if isinstance(mode, str):  # sentence-transformers >= 6: {"pooling_mode": "mean", ...}
        ours = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}.get(mode)
        if ours is None:
            raise ValueError(f"{path}: pooling_mode {mode!r} is not supported; hpcinfer "
                             "supports cls, mean and lasttoken")
        return ours
    bad = [k for k in _ST_UNSUPPORTED if config.get(k)]
    chosen = [ours for key, ours in _ST_MODES.items() if config.get(key)]
    if bad or len(chosen) != 1:
        found = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
        raise ValueError(f"{path}: hpcinfer supports exactly one of {sorted(_ST_MODES)} set "
                         f"to true, found {found}")
    return chosen[0]


def _max_seq_length(model_dir: Path) -> int | None:
    path = model_dir / "sentence_bert_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("max_seq_length")


def pool(hidden: torch.Tensor, cu_seqlens: list[int], pooling_type: str) -> torch.Tensor:
    """hidden: [T, H] of packed sequences with boundaries ``cu_seqlens`` -> [N, H] float32."""
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    if pooling_type == "CLS":
        return hidden[starts].float()
    if pooling_type == "LAST":
        return hidden[[e - 1 for e in ends]].float()
    # MEAN: one segment sum for the whole step (a per-sequence loop costs a launch each on GPU)
    lens = torch.tensor([e - s for s, e in zip(starts, ends)], device=hidden.device)
    segment = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    sums = torch.zeros(len(lens), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    return sums.index_add_(0, segment, hidden.float()) / lens[:, None]


_DENSE_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": torch.tanh,
                      "torch.nn.modules.linear.Identity": lambda x: x}


class DenseProjection:
    """A sentence-transformers ``Dense`` module: act(x W^T + b), in float32."""

    def __init__(self, module_dir: str | Path, device: torch.device | str = "cpu"):
        module_dir = Path(module_dir)
        config = json.loads((module_dir / "config.json").read_text())
        act = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        if act not in _DENSE_ACTIVATIONS or config.get("use_residual"):
            raise ValueError(f"{module_dir}: Dense with activation {act!r}"
                             f"{' and use_residual' if config.get('use_residual') else ''} is "
                             f"not supported (supported: {sorted(_DENSE_ACTIVATIONS)})")
        self.activation = _DENSE_ACTIVATIONS[act]
        tensors = _dense_tensors(module_dir)
        self.weight = tensors["linear.weight"].float().to(device)  # [out, in]
        bias = tensors.get("linear.bias")
        self.bias = None if bias is None else bias.float().to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x.float(), self.weight, self.bias))


def _dense_tensors(module_dir: Path) -> dict[str, torch.Tensor]:
    if (module_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(module_dir / "model.safetensors"))
    if (module_dir / "pytorch_model.bin").is_file():
        return torch.load(module_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{module_dir}: no model.safetensors or pytorch_model.bin for the "
                            "Dense module; the checkpoint download is incomplete")


def finish_embedding(pooled: torch.Tensor, *, normalize: bool,
                     dimensions: int | None = None) -> torch.Tensor:
    """pooled: [N, H] -> [N, dimensions or H]: Matryoshka truncation, then L2 normalization."""
    if dimensions is not None:
        if not 1 <= dimensions <= pooled.shape[-1]:
            raise ValueError(f"dimensions={dimensions} must be between 1 and the model's "
                             f"embedding size {pooled.shape[-1]}")
        pooled = pooled[..., :dimensions]
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def classification_activation(logits: torch.Tensor) -> torch.Tensor:
    """vLLM's classify activation: softmax over labels, sigmoid when there is one label."""
    return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
