"""Tiny MXFP4 gpt-oss checkpoints, built offline: a tiny unquantized gpt-oss checkpoint's expert
weights packed into the layout of OpenAI's released gpt-oss checkpoints (see
hpcinfer.layers.quant.mxfp4 for the format), everything else copied as is.

``quantize_mxfp4`` rounds to the nearest e2m1 value under a power-of-two scale per block of 32
(the largest magnitude of a block maps to at most 6); the loader only has to read it back, so
the rounding rule matters only in that it gives every code and many scales a workout.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
}
_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def quantize_mxfp4(w):
    """``w`` [..., in] (in a multiple of 32) -> (blocks uint8 [..., in/32, 16], scales uint8
    [..., in/32]): codes of the nearest e2m1 values, low nibble = even element."""
    import torch
    from hpcinfer.layers.quant.mxfp4 import E8M0_BIAS, FP4_E2M1_VALUES
    w = w.float()
    *lead, n = w.shape
    groups = w.reshape(*lead, n // 32, 32)
    amax = groups.abs().amax(-1)
    # smallest power of two with amax / 2**e <= 6
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-30) / 6.0)),
                      torch.zeros_like(amax)).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    lut = torch.tensor(FP4_E2M1_VALUES[:8])
    magnitude = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1)     # codes 0..7
    codes = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp + E8M0_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def _rewrite(src: Path, dst: Path, convert) -> None:
    """Copy checkpoint ``src`` to ``dst``, each shard's tensors passed through
    ``convert(name, tensor) -> {name: tensor}``, the index rewritten to match."""
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, tensor in load_file(src / shard).items():
            out.update(convert(name, tensor))
        save_file({k: v.contiguous() for k, v in out.items()}, dst / shard,
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name in out})
    index["weight_map"] = dict(sorted(weight_map.items()))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_mxfp4_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """``src``: an unquantized gpt-oss checkpoint (experts ``[E, in, out]``, in and out
    multiples of 32). Writes the MXFP4 copy to ``dst`` (``*_blocks`` [E, out, in/32, 16] and
    ``*_scales`` [E, out, in/32], config.json with quant_method mxfp4) and returns it."""
    src, dst = Path(src), Path(dst)

    def convert(name, tensor):
        if not _EXPERTS.search(name):
            return {name: tensor}
        blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))    # rows = output features
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    _rewrite(src, dst, convert)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = dict(MXFP4_QUANTIZATION_CONFIG)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_dequantized_checkpoint(src: str | Path, dst: str | Path, dequantize) -> Path:
    """The unquantized (fp32) copy of MXFP4 checkpoint ``src``: ``dequantize(blocks, scales)``
    must return the checkpoint's ``[E, in, out]`` tensor (pass the oracle's own function, e.g.
    transformers' ``convert_moe_packed_tensors``); quantization_config is dropped."""
    import torch
    src, dst = Path(src), Path(dst)
    pairs: dict[str, dict[str, torch.Tensor]] = {}

    def convert(name, tensor):
        base, _, kind = name.rpartition("_")
        if kind not in ("blocks", "scales") or not _EXPERTS.search(base):
            return {name: tensor}
        pairs.setdefault(base, {})[kind] = tensor
        if len(pairs[base]) < 2:
            return {}
        pair = pairs.pop(base)
        return {base: dequantize(pair["blocks"], pair["scales"]).to(torch.float32)}

    _rewrite(src, dst, convert)
    if pairs:
        raise ValueError(f"{src}: blocks and scales of {sorted(pairs)[0]} are in different "
                         "shards; this helper pairs them per shard")
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
