"""Does an adapter fit a base checkpoint? Answered from the base's config.json, without torch
(``hpcinfer validate`` runs it on the login node for each of a job's lora.adapters).

The sizes are those of the Llama-style decoder layers LoRA applies to: the engine checks the
same against the loaded model's layers (lora/adapter.py), so a model the engine accepts here
also loads there.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from hpcinfer.lora.adapter_config import AdapterConfig

_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_BLOCK_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def base_sizes(config: dict) -> dict[str, tuple[int, int]]:
    """HF projection name -> (input features, output features) of a Llama-style config."""
    text = config.get("text_config") or config
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    inter = text.get("intermediate_size")
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def adapter_base_problem(adapter: AdapterConfig, model_dir: str | Path) -> str | None:
    """Why ``adapter`` does not fit the checkpoint in model_dir (None: it fits, or the base
    has no readable config.json to check against)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        sizes, num_layers = base_sizes(config), (config.get("text_config") or config)[
            "num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for module, (a_shape, b_shape) in adapter.modules.items():
        match = _MODULE.match(module)
        if match is None or _BLOCK_OF.get(match[3]) != match[2]:
            return (f"it targets {module}, which is not a projection of a Llama-style decoder "
                    "layer (model.layers.N.self_attn.q/k/v/o_proj, model.layers.N.mlp."
                    "gate/up/down_proj): an adapter of another architecture")
        if int(match[1]) >= num_layers:
            return (f"it targets {module} but the base has {num_layers} layers: an adapter of "
                    "another base model")
        want = sizes[match[3]]
        if (a_shape[1], b_shape[0]) != want:
            return (f"{module} maps {a_shape[1]} -> {b_shape[0]} features but the base's maps "
                    f"{want[0]} -> {want[1]}: an adapter of another base model "
                    f"(base_model_name_or_path={adapter.base_model!r})")
    return None
