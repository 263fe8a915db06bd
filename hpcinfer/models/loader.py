"""Our safetensors weight loader: sharded (model.safetensors.index.json) or single-file,
memory-mapped, each tensor copied once into its (already allocated, target-dtype) parameter;
and ``load_dummy_weights`` (vLLM's ``load_format="dummy"``): random weights, nothing read.

Names are matched exactly. A checkpoint tensor with no parameter, a parameter (or a piece of
a merged one) that no tensor filled, a missing shard file and a wrong shape are all errors that
name the tensor and the file.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from hpcinfer.layers.linear import WeightShapeError, default_weight_loader

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers that some checkpoints carry but that we recompute.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def rename_prefix(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with the first matching checkpoint prefix replaced by ours (a model's
    ``checkpoint_name`` for layouts that differ only in where the parts sit)."""
    for theirs, ours in renames:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, checking every listed file exists."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(
                    f"shard {shard.name} listed in {index_path} is missing from {model_dir}: "
                    "the download is incomplete; download the checkpoint again")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}: this loader reads "
                            "safetensors checkpoints only")


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) for every tensor, one shard open at a time (memory-mapped)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name), path


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint in ``model_dir``.

    ``model.packed_modules_mapping`` maps HF projection names onto merged ones, e.g.
    ``{"q_proj": ("qkv_proj", "q")}``; a model may define ``checkpoint_name(name)`` to rename
    legacy tensor names; ``model.unused_checkpoint_suffixes`` names tensors to skip (set by
hpcinfer.layers.quant for scales it does not use), and ``model.transform_checkpoint`` may
rewrite the (name, tensor, file) stream (bitsandbytes weights dequantized). Tied parameters
(one tensor under two names) load once.
    """
    params = dict(model.named_parameters())  # tied params appear once, under the first name
    modules = dict(model.named_modules())
    needed = _needed_pieces(model, params)
    loaded: set[tuple[str, object]] = set()
    tensors = iter_checkpoint(model_dir)
    if getattr(model, "load_slices_only", False):  # TP/PP ranks read just their slices
        from hpcinfer.distributed.slices import iter_checkpoint_lazy
        tensors = iter_checkpoint_lazy(checkpoint_files(model_dir))
    transform = getattr(model, "transform_checkpoint", None)
    if transform is not None:   # e.g. bitsandbytes parts -> one dequantized weight
        tensors = transform(tensors)
    for name, tensor, path in tensors:
        target = _target_of(model, name, params)
        if target is None:
            continue
        if target is _UNKNOWN:
            raise ValueError(f"checkpoint tensor {name} in {path.name} matches no parameter of "
                             f"{type(model).__name__}: is config.json for a different "
                             "architecture?")
        param_name, shard_id = target
        module_name, _, _ = param_name.rpartition(".")
        loader = getattr(modules[module_name], "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(params[param_name], tensor)
            elif shard_id is None:
                loader(params[param_name], tensor)
            else:
                loader(params[param_name], tensor, shard_id)
        except WeightShapeError as err:
            raise ValueError(f"tensor {name} in {path.name} has the wrong shape: expected "
                             f"{err.expected}, found {err.found} (does config.json match "
                             "the weights?)") from None
        loaded.add((param_name, shard_id))
    missing = sorted(f"{p}" + ("" if s is None else f" ({s})") for p, s in needed - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} has no tensor for {len(missing)} parameter(s): "
                         f"{', '.join(missing[:10])}")
    log.info("loaded %d tensors from %s", len(loaded), model_dir)


def _needed_pieces(model: nn.Module, params: dict[str, nn.Parameter]) -> set[tuple[str, object]]:
    modules = dict(model.named_modules())
    needed = set()
    for param_name in params:
        module_name, _, _ = param_name.rpartition(".")
        for shard_id in getattr(modules[module_name], "shard_ids", (None,)):
            needed.add((param_name, shard_id))
    return needed


_UNKNOWN = ("", None)  # sentinel: a tensor with no parameter


def _target_of(model: nn.Module, name: str, params: dict[str, nn.Parameter]
               ) -> tuple[str, object] | None:
    """(parameter name, shard id) a checkpoint tensor goes to; None if it is to be skipped,
    ``_UNKNOWN`` if nothing takes it."""
    if name.endswith(IGNORABLE_SUFFIXES + getattr(model, "unused_checkpoint_suffixes", ())):
        return None
    rename = getattr(model, "checkpoint_name", None)
    if rename is not None:
        name = rename(name)
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return None  # some tied checkpoints store the head too; it equals the embedding
    owns = getattr(model, "pp_owns_tensor", None)
    if owns is not None and not owns(name):
        return None  # a layer of another pipeline stage
    for hf_part, (ours, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        merged = name.replace(f".{hf_part}.", f".{ours}.")
        if merged != name and merged in params:
            return merged, shard_id
    if name in params:
        return name, None
    return _UNKNOWN


DUMMY_EMBEDDING_RANGE = 1.0   # embeddings U(-1, 1): the first RMSNorm rescales them anyway
DUMMY_VECTOR_RANGE = 0.02     # biases, sinks and other 1-D parameters that are not norms


def load_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter with seeded random values instead of reading a checkpoint
    (``load_format="dummy"``: benchmarks and shape checks of models one cannot or need not
    download, e.g. a 70B W4A16 model from its config.json alone).

    Each module draws from its own generator seeded by ``seed`` and its name, on the
    parameter's device: the same seed gives the same weights on the same device, whatever
    the tensor-parallel layout or the order of the parameters. A quantized linear layer fills
    its checkpoint-layout parameters through its method (``QuantMethod.dummy_weights``: packed
    4-bit codes, fp8 codes with scales), so its ``process_after_loading`` runs unchanged.
    Other parameters: 2-D and larger U(+-1/sqrt(last dim)) (embeddings U(+-1)), norm weights
    1, other vectors U(+-0.02). The values are small enough for bf16 to stay finite through
    any depth (every layer's output keeps its input's scale), not a trained model's: the
    generated text is meaningless.
    """
    from hpcinfer.layers.linear import LinearBase
    done: set[int] = set()
    count = 0
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in done]
        if not own:
            continue
        gen = torch.Generator(device=own[0][1].device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2 ** 63)
        if isinstance(module, LinearBase):
            module.quant_method.dummy_weights(module, gen)
        else:
            for name, param in own:
                _dummy_fill(f"{module_name}.{name}", module, param, gen)
        for _, param in own:
            done.add(id(param))
            count += 1
    log.info("load_format=dummy: %d parameters filled with random values (seed %d)", count, seed)


def _dummy_fill(name: str, module: nn.Module, param: nn.Parameter, gen: torch.Generator
                ) -> None:
    from hpcinfer.layers.quant.base import uniform_
    data = param.data
    if not data.is_floating_point():
        data.zero_()
    elif data.dim() == 1 and "norm" in name.lower():
        data.fill_(1.0)
    elif data.dim() == 1:
        uniform_(data, DUMMY_VECTOR_RANGE, gen)
    elif "embed" in name.lower() or type(module).__name__.endswith("Embedding"):
        uniform_(data, DUMMY_EMBEDDING_RANGE, gen)
    else:
        uniform_(data, float(data.shape[-1]) ** -0.5, gen)
