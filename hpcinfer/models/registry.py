"""Architecture name -> model class, and ``load_model``: config, meta-device build, weights.

Model classes are imported lazily so that importing the registry stays cheap.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcinfer.layers.attention import AttentionBackend, get_attention_backend
from hpcinfer.layers.linear import NO_TP, TensorParallel
from hpcinfer.layers.rotary import max_position_of
from hpcinfer.layers.quant.apply import apply_quantization, finish_quantization
from hpcinfer.models.loader import checkpoint_files, load_dummy_weights, load_weights
from hpcinfer.models.spec import ModelSpec, head_dim_of, token_ids
from hpcinfer.models.support import (  # noqa: F401  (re-exported: the public names)
    architecture_of, known_architecture, supported_architectures, supported_text)

log = logging.getLogger(__name__)


def model_class(architecture: str) -> type[nn.Module]:
    """The model class for a supported architecture name."""
    if not known_architecture(architecture):
        raise ValueError(f"unsupported model architecture {architecture!r}; hpcinfer supports: "
                         f"{supported_text()}")
    module_name, class_name = known_architecture(architecture)
    return getattr(importlib.import_module(module_name), class_name)


def load_config(model_path: str | Path) -> Any:
    """The HF config of a local checkpoint directory, via transformers.AutoConfig."""
    from transformers import AutoConfig

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: model must be a local checkpoint "
                                "directory (run \"hpcinfer download <id>\" on a login node)")
    # Check the architecture before transformers parses the file: a model_type it does not
    # know would otherwise fail with its own, less helpful error.
    raw = json.loads((path / "config.json").read_text())
    architecture_of(type("RawConfig", (), {"architectures": raw.get("architectures")}))
    return AutoConfig.from_pretrained(str(path))


def load_model(model_path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
               attention_backend: str | AttentionBackend = "auto",
               tp: TensorParallel = NO_TP, pp: Any = None, quantization: str | None = None,
               expert_parallel: bool = False, load_format: str = "auto",
               seed: int = 0) -> nn.Module:
    """Build the model of a local checkpoint on the meta device, then load its weights.

    ``tp``/``pp`` (a hpcinfer.distributed.groups.PipelineStage) make it this rank's part.
    ``quantization`` (vLLM's argument; None: the checkpoint's quantization_config) picks the
    linear layers' method (hpcinfer.layers.quant); a config it cannot run is refused here,
    before any weight is read.
    ``expert_parallel``: a MoE model spreads whole experts over the tensor-parallel ranks
    instead of splitting each expert (vLLM's enable_expert_parallel); dense models ignore it.
    ``load_format="dummy"`` (vLLM's name): random weights seeded by ``seed``
    (hpcinfer.models.loader.load_dummy_weights); only config.json is read.

    The returned model is in eval mode with ``model.spec`` (a ModelSpec) set. ``dtype`` is a
    torch.dtype (resolving "auto" is the caller's job); parameters are allocated directly on
    ``device`` in ``dtype`` and each tensor is converted once while copying.
    """
    config = load_config(model_path)
    architecture = architecture_of(config)
    device = torch.device(device)
    backend = (get_attention_backend(attention_backend, device)
               if isinstance(attention_backend, str) else attention_backend)
    cls = model_class(architecture)
    if getattr(cls, "takes_images", False) and pp is not None and pp.size > 1:
        raise ValueError(f"{architecture} runs in one process for now (images with pipeline "
                         "parallelism are not built yet, docs/vision.md): set "
                         "pipeline_parallel_size=1")
    extra = {}
    if expert_parallel and getattr(cls, "supports_expert_parallel", False):
        extra["expert_parallel"] = True
    elif expert_parallel:
        log.info("%s has no experts: expert parallelism changes nothing", architecture)
    # Layout errors (heads or experts that do not divide) are raised here, before any read.
    with torch.device("meta"):
        model = cls(config, attention_backend=backend, tp=tp, **extra)
    if pp is not None and pp.size > 1:
        from hpcinfer.distributed.pipeline import prune_to_stage
        prune_to_stage(model, pp)  # only this stage's layers get memory and weights
    model.load_slices_only = tp.size > 1 or (pp is not None and pp.size > 1)
    model = model.to(dtype=dtype)
    dummy = load_format == "dummy"
    _quantize(model, model_path, quantization, dtype, tp, dummy)  # on meta: nothing read yet
    _check_weights_fit(model, device, tp, pp)
    model = model.to_empty(device=device)
    model.tie_weights()  # leaving the meta device unties shared parameters
    _init_buffers(model)
    with torch.no_grad():
        if dummy:
            load_dummy_weights(model, seed)
        else:
            load_weights(model, model_path)
        finish_quantization(model)
        for module in model.modules():   # modules that re-lay out their loaded weights
            after_loading = getattr(module, "after_loading", None)
            if after_loading is not None:
                after_loading()
    model.eval().requires_grad_(False)  # inference only: never build an autograd graph
    model.spec = model_spec(config, architecture, dtype, tp, model_path)
    if pp is not None and pp.size > 1:
        from hpcinfer.distributed.pipeline import stage_spec
        model.spec = stage_spec(model.spec, pp)
    log.info("loaded %s from %s (%s, %s, backend %s)", architecture, model_path, dtype, device,
             backend.name)
    return model


def _quantize(model: nn.Module, model_path: str | Path, quantization: str | None,
              dtype: torch.dtype, tp: TensorParallel, dummy: bool = False) -> None:
    from hpcinfer.layers.quant.config import quant_spec_of
    spec = quant_spec_of(json.loads((Path(model_path) / "config.json").read_text()),
                         quantization)
    if spec is not None:   # dummy weights: no checkpoint whose tensors could be missing
        names = None if dummy else list(checkpoint_files(model_path))
        apply_quantization(model, spec, dtype, names, tp.size)


def _check_weights_fit(model: nn.Module, device: torch.device, tp: TensorParallel,
                       pp: Any) -> None:
    # On the meta model (after quantization chose its dtypes): refuse before reading weights.
    if device.type != "cuda":
        return
    from hpcinfer.distributed.layout import weights_fit_problem
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free_bytes, _ = torch.cuda.mem_get_info(device)
    num_ranks = tp.size * (pp.size if pp is not None else 1)
    problem = weights_fit_problem(weight_bytes, free_bytes, num_ranks,
                                  getattr(model, "supports_expert_parallel", False))
    if problem is not None:
        raise ValueError(problem)


def _init_buffers(model: nn.Module) -> None:
    # Non-persistent buffers (rotary cos/sin) are computed, never loaded.
    for module in model.modules():
        init = getattr(module, "init_buffers", None)
        if init is not None:
            init()


def model_spec(config: Any, architecture: str, dtype: torch.dtype,
               tp: TensorParallel = NO_TP, model_path: str | Path | None = None) -> ModelSpec:
    """The engine-facing facts of a model (per tensor-parallel rank where that matters)."""
    cls = model_class(architecture)
    if getattr(cls, "takes_images", False):  # vision-language: the language model's sizes
        config = config.get_text_config()
    windows = {getattr(cls, "sliding_window_for", lambda c, i: None)(config, i)
               for i in range(config.num_hidden_layers)}
    eos = token_ids(getattr(config, "eos_token_id", None))
    eos += tuple(i for i in _generation_config_eos(model_path) if i not in eos)
    return ModelSpec(
        architecture=architecture,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads // tp.size,
        num_kv_heads=max((getattr(config, "num_key_value_heads", None)
                          or config.num_attention_heads) // tp.size, 1),  # 1: replicated
        head_dim=head_dim_of(config),
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=max_position_of(config),  # yarn/dynamic extend the config's
        sliding_window=windows.pop() if len(windows) == 1 else None,
        dtype=dtype,
        eos_token_ids=eos,
        bos_token_id=getattr(config, "bos_token_id", None),
    )


def _generation_config_eos(model_path: str | Path | None) -> tuple[int, ...]:
    if model_path is None:
        return ()
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return ()
    return token_ids(json.loads(path.read_text()).get("eos_token_id"))
