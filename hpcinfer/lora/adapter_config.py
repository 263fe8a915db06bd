"""A PEFT LoRA adapter directory, read and checked without torch (the login side uses it).

adapter_config.json gives the rank, lora_alpha and use_rslora; the safetensors header (a
JSON block at the start of adapter_model.safetensors) gives every tensor's name and shape, so
what the adapter targets and at which sizes is known without loading a tensor.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# The projections a LoRA may target (HF names of Llama-style decoder layers).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class AdapterConfig:
    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    base_model: str | None
    # HF module path (model.layers.0.self_attn.q_proj) -> (A shape [r, in], B shape [out, r])
    modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def scaling(self) -> float:
        """What PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def target_names(self) -> set[str]:
        return {m.rsplit(".", 1)[-1] for m in self.modules}


def read_adapter_config(path: str | Path, label: str | None = None) -> AdapterConfig:
    """Read and check an adapter directory; AdapterError says what is wrong and what to do."""
    path = Path(path)
    what = f"LoRA adapter {label or str(path)!r}"
    if not path.is_dir():
        raise AdapterError(f"{what}: {path} is not a directory: give the PEFT adapter "
                           f"directory (it holds {CONFIG_FILE} and {WEIGHTS_FILE}), or run "
                           "'hpcinfer download' for a hub adapter on a login node")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            hint = (" (a .bin adapter: re-save it with peft's save_pretrained, which writes "
                    "safetensors)" if name == WEIGHTS_FILE and
                    (path / "adapter_model.bin").is_file() else "")
            raise AdapterError(f"{what}: {path / name} is missing{hint}; a PEFT adapter "
                               f"directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{what}: cannot read {path / CONFIG_FILE}: {e}") from None
    _check_peft_options(raw, what)
    modules = _modules(path / WEIGHTS_FILE, what)
    rank = int(raw.get("r", 0))
    for module, (a_shape, b_shape) in modules.items():
        if a_shape[0] != rank or b_shape[1] != rank:
            raise AdapterError(f"{what}: {module} has rank {a_shape[0]} but {CONFIG_FILE} says "
                               f"r={rank}; per-module ranks (rank_pattern) are not supported")
    return AdapterConfig(str(path), rank, float(raw.get("lora_alpha", rank)),
                         bool(raw.get("use_rslora", False)),
                         raw.get("base_model_name_or_path"), modules)


def _check_peft_options(raw: dict, what: str) -> None:
    refused = {
        "peft_type": (raw.get("peft_type", "LORA") != "LORA",
                      f"is a {raw.get('peft_type')} adapter; only LoRA is supported"),
        "use_dora": (bool(raw.get("use_dora")), "uses DoRA, which is not supported"),
        "bias": (raw.get("bias", "none") != "none",
                 f"trains biases (bias={raw.get('bias')!r}); only bias='none' is supported"),
        "modules_to_save": (bool(raw.get("modules_to_save")),
                            f"saves whole modules ({raw.get('modules_to_save')}); merge it "
                            "with peft's merge_and_unload instead"),
        "rank_pattern": (bool(raw.get("rank_pattern")), "has per-module ranks (rank_pattern)"),
        "alpha_pattern": (bool(raw.get("alpha_pattern")),
                          "has per-module alphas (alpha_pattern)"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise AdapterError(f"{what} {why} ({CONFIG_FILE}: {key}); hpcinfer cannot serve "
                               "it: merge it into the base with peft's merge_and_unload")
    if not isinstance(raw.get("r"), int) or raw["r"] < 1:
        raise AdapterError(f"{what}: {CONFIG_FILE} has no valid rank r (got {raw.get('r')!r})")


def _modules(weights: Path, what: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    header = safetensors_header(weights, what)
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{what}: tensor {key!r} is not a LoRA A/B weight (embedding "
                               "LoRA, trained biases and saved modules are not supported); "
                               "only LoRA on q/k/v/o/gate/up/down projections is")
        module = match["module"]
        if module.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS:
            raise AdapterError(f"{what}: it targets {module}; hpcinfer applies LoRA to "
                               f"{', '.join(SUPPORTED_TARGETS)} only")
        found.setdefault(module, {})[match["ab"]] = tuple(info["shape"])
    if not found:
        raise AdapterError(f"{what}: {weights.name} holds no LoRA weights")
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{what}: {module} has lora_{''.join(pair)} but not both A and "
                               "B; the file is incomplete: save the adapter again")
    return {m: (pair["A"], pair["B"]) for m, pair in sorted(found.items())}


def parse_key(key: str) -> tuple[str, str] | None:
    """("model.layers.0.self_attn.q_proj", "A") for a PEFT LoRA key, None for anything else."""
    match = _KEY.match(key)
    return None if match is None else (match["module"], match["ab"])


def safetensors_header(path: Path, what: str) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without torch."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise AdapterError(f"{what}: {path} is not a readable safetensors file ({e}); save "
                           "the adapter again with peft's save_pretrained") from None


def check_rank(config: AdapterConfig, max_lora_rank: int, label: str) -> None:
    if config.rank > max_lora_rank:
        raise AdapterError(f"LoRA adapter {label!r} has rank {config.rank}, more than "
                           f"max_lora_rank={max_lora_rank}: raise max_lora_rank to at least "
                           f"{config.rank}")
