"""Login-side checks of the checkpoint's config.json: what the engine would refuse at start-up
(after the queue wait and on a GPU), refused by `validate`/`render` instead, with the engine's
own message. Pure Python (json): the tables come from hpcinfer.models.support, which the
engine reads too, so both sides always agree on what loads.

Checked: the architecture, every rope type (``rope_parameters`` of transformers 5, including
its per-layer-type dicts, or ``rope_scaling`` of transformers 4, at the top level and in a
``text_config``), ``quantization_config.quant_method``, the head counts against
parallel.tensor / parallel.pipeline, and a MoE model's expert sizes against parallel.tensor.
A model directory without a readable config.json is left to the other checks (not
downloaded yet, or a path typo: config/checks.py).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from hpcinfer.models import support

FIX_MODEL = "pick a model hpcinfer loads (`hpcinfer models --supported` lists them)"


def read_config_json(model_dir: str) -> dict | None:
    """The checkpoint's config.json as a dict; None when there is none to read."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(hf: dict, tensor: int = 1, pipeline: int = 1) -> tuple[str, str] | None:
    """(config key, the engine's message) for the first thing the engine cannot load, or None."""
    try:
        support.architecture_of(_Names(hf.get("architectures")))
    except ValueError as exc:
        return "model.id", str(exc) + _multimodal_hint(hf)
    for rope_type in rope_types(hf):
        if rope_type not in support.SUPPORTED_ROPE_TYPES:
            return "model.id", (f"unsupported rope_type {rope_type!r}; supported: "
                                f"{list(support.SUPPORTED_ROPE_TYPES)}")
    method = quant_method(hf)
    if method is not None and method not in support.SUPPORTED_QUANT_METHODS:
        supported = ", ".join(support.SUPPORTED_QUANT_METHODS) or "none yet (unquantized " \
            "float16/bfloat16/float32 checkpoints only)"
        return "model.id", (f"quantized checkpoints (quant_method {method}) are not supported "
                            f"yet; supported: {supported}")
    return _layout_problem(_text_config(hf), tensor, pipeline)


class _Names:
    def __init__(self, architectures: Any):
        self.architectures = architectures if isinstance(architectures, list) else []


def _text_config(hf: dict) -> dict:
    text = hf.get("text_config")
    return text if isinstance(text, dict) and "num_attention_heads" not in hf else hf


def rope_types(hf: dict) -> Iterator[str]:
    """Every rope type a config asks for (its text_config's too), "default" when it names none."""
    for config in (hf, hf.get("text_config")):
        if not isinstance(config, dict):
            continue
        for params in _rope_dicts(config):
            rope_type = str(params.get("rope_type", params.get("type", "default")) or "default")
            yield support.rope_type_alias(config.get("model_type"), rope_type)


def _rope_dicts(config: dict) -> Iterator[dict]:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        yield from params.values()        # transformers 5, per layer type (Gemma 3)
    elif isinstance(params, dict) and params:
        yield params
    elif isinstance(config.get("rope_scaling"), dict):
        yield config["rope_scaling"]      # transformers 4


def quant_method(hf: dict) -> str | None:
    quant = hf.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    return str(quant.get("quant_method") or "unknown")


def _layout_problem(hf: dict, tensor: int, pipeline: int) -> tuple[str, str] | None:
    if tensor * pipeline == 1:
        return None
    from hpcinfer.distributed.layout import layout_problem
    try:
        heads, layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        kv_heads = hf.get("num_key_value_heads")
        kv_heads = None if kv_heads is None else int(kv_heads)
    except (KeyError, TypeError, ValueError):
        return None      # the engine reads these through transformers; not ours to guess
    problem = layout_problem(heads, kv_heads, layers, tensor, pipeline)
    if problem is None:
        problem = _expert_problem(hf, tensor)
    return None if problem is None else (f"parallel.{problem[0]}", problem[1])


def _expert_problem(hf: dict, tensor: int) -> tuple[str, str] | None:
    # MoE checkpoints: each expert's intermediate dimension is split over the TP ranks.
    from hpcinfer.distributed.layout import expert_layout_problem, moe_sizes
    sizes = moe_sizes(hf)
    message = None if sizes is None else expert_layout_problem(*sizes, tensor)
    return None if message is None else ("tensor", message)


def _multimodal_hint(hf: dict) -> str:
    if isinstance(hf.get("text_config"), dict) or isinstance(hf.get("vision_config"), dict):
        return (" (this is a multimodal checkpoint: images are not supported yet; a text-only "
                "checkpoint of the same family may be)")
    return ""


def check_checkpoint(cfg) -> None:
    """Raise the ConfigError the engine's refusal would have been, at the key that caused it."""
    hf = read_config_json(cfg.model.id)
    if hf is None:
        return
    tensor, pipeline = cfg.parallel.tensor, cfg.parallel.pipeline
    if "architectures" in hf:
        problem = checkpoint_problem(hf, tensor, pipeline)
    else:       # no architecture named (a hand-made stub): only the head counts to check
        problem = _layout_problem(hf, tensor, pipeline)
    if problem is None:
        return
    key, message = problem
    fix = FIX_MODEL if key == "model.id" else (
        "pick a value that fits the model, and keep tensor x pipeline = gpus_per_node x nodes")
    raise cfg.error_at(key, f"{message} ({os.path.join(cfg.model.id, 'config.json')})", fix)
