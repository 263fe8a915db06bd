"""Login-side checks of the checkpoint's config.json: what the engine would refuse at start-up
(after the queue wait and on a GPU), refused by `validate`/`render` instead, with the engine's
own message. Pure Python (json): the tables come from hpcinfer.models.support, which the
engine reads too, so both sides always agree on what loads.

Checked: the architecture, every rope type (``rope_parameters`` of transformers 5, including
its per-layer-type dicts, or ``rope_scaling`` of transformers 4, at the top level and in a
``text_config``), the quantization (hpcinfer.layers.quant.config: the method, block and
group sizes against the layers' shapes per rank, every scale present in the safetensors
index), the head counts against
parallel.tensor / parallel.pipeline, and a MoE model's expert sizes against parallel.tensor.
A model directory without a readable config.json is left to the other checks (not
downloaded yet, or a path typo: config/checks.py).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from hpcinfer.layers.quant import config as quant_config
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


def job_config_json(cfg) -> dict | None:
    """The config.json the job's engine will load: the checkpoint's, with the job's
    model.hf_overrides merged over it (engine/hf_overrides.py does the same at load)."""
    from hpcinfer.engine.hf_overrides import merge_overrides
    hf = read_config_json(cfg.model.id)
    overrides = getattr(cfg.model, "hf_overrides", None)
    return merge_overrides(hf, overrides) if hf is not None and overrides else hf


def checkpoint_problem(hf: dict, tensor: int = 1, pipeline: int = 1,
                       quantization: str | None = None) -> tuple[str, str] | None:
    """(config key, the engine's message) for the first thing the engine cannot load, or None."""
    try:
        support.architecture_of(_Names(hf.get("architectures")))
    except ValueError as exc:
        return "model.id", str(exc) + _multimodal_hint(hf)
    for rope_type in rope_types(hf):
        if rope_type not in support.SUPPORTED_ROPE_TYPES:
            return "model.id", (f"unsupported rope_type {rope_type!r}; supported: "
                                f"{list(support.SUPPORTED_ROPE_TYPES)}")
    problem = quant_config.config_problem(_text_config_with_quant(hf), tensor, quantization)
    if problem is not None:
        return "model.id", problem
    return _layout_problem(_text_config(hf), tensor, pipeline)


def _text_config_with_quant(hf: dict) -> dict:
    text = _text_config(hf)
    if text is not hf and "quantization_config" in hf:
        return {**text, "quantization_config": hf["quantization_config"]}
    return text


def quantization_problem(hf: dict, model_dir: str, quantization: str | None = None
                         ) -> str | None:
    """The engine's refusal of a checkpoint whose tensors miss a scale its quantization needs
    (read from the safetensors index or header: names only, nothing loaded)."""
    try:
        spec = quant_config.quant_spec_of(hf, quantization)
    except quant_config.QuantConfigError:
        return None      # checkpoint_problem reports it
    names = None if spec is None or spec.online else _tensor_names(model_dir)
    if names is None:
        return None
    problem = quant_config.missing_tensor_problem(spec, names)
    if problem is None and spec.is_mxfp4:
        shapes = _tensor_shapes(model_dir)
        if shapes is not None:
            problem = quant_config.mxfp4_shapes_problem(_text_config(hf), shapes)
    return problem


def quantization_note(cfg) -> str | None:
    """What validate says of a quantized checkpoint: its scheme and whether the job's GPU
    (resources.gpu_type) runs it natively (FP8 needs compute capability >= 8.9)."""
    hf = job_config_json(cfg)
    quantization = getattr(cfg.engine, "quantization", None)
    try:
        spec = None if hf is None else quant_config.quant_spec_of(hf, quantization)
    except quant_config.QuantConfigError:
        return None      # refused already by check_checkpoint
    if spec is None:
        return None
    return quant_config.runtime_note(spec, getattr(cfg.resources, "gpu_type", None),
                                     str(getattr(cfg.resources, "device", "cuda")))


def _tensor_names(model_dir: str) -> list[str] | None:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                return list(json.load(f)["weight_map"])
        with open(single, "rb") as f:   # safetensors: 8-byte length, then a JSON header
            size = int.from_bytes(f.read(8), "little")
            return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tensor_shapes(model_dir: str) -> dict[str, list[int]] | None:
    """Tensor name -> shape from every safetensors header (JSON only, no data read)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        shapes: dict[str, list[int]] = {}
        for name in files:
            with open(os.path.join(model_dir, name), "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            shapes.update({k: list(v["shape"]) for k, v in header.items()
                           if k != "__metadata__"})
        return shapes
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        return (" (this is a multimodal checkpoint of a family hpcinfer does not run yet; "
                "the vision-language families it runs are LlavaForConditionalGeneration, "
                "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and "
                "Gemma3ForConditionalGeneration (docs/vision.md), and a text-only checkpoint "
                "of the same family may load)")
    return ""


def check_checkpoint(cfg) -> None:
    """Raise the ConfigError the engine's refusal would have been, at the key that caused it."""
    hf = job_config_json(cfg)
    if hf is None:
        return
    tensor, pipeline = cfg.parallel.tensor, cfg.parallel.pipeline
    quantization = getattr(cfg.engine, "quantization", None)
    if "architectures" in hf:
        problem = checkpoint_problem(hf, tensor, pipeline, quantization)
        missing = quantization_problem(hf, cfg.model.id, quantization)
        if problem is None and missing is not None:
            problem = ("model.id", missing)
    else:       # no architecture named (a hand-made stub): only the head counts to check
        problem = _layout_problem(hf, tensor, pipeline)
    if problem is None:
        return
    key, message = problem
    fix = FIX_MODEL if key == "model.id" else (
        "pick a value that fits the model, and keep tensor x pipeline = gpus_per_node x nodes")
    raise cfg.error_at(key, f"{message} ({os.path.join(cfg.model.id, 'config.json')})", fix)
