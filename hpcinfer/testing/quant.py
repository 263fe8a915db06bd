"""Quantized tiny checkpoints for tests, packed the way the published tools pack them, each
with its fp32 oracle: the same model with every quantized weight replaced by its exact
dequantized value, which transformers loads plainly.

The packers mirror the formats' own code, not hpcinfer's unpackers (the references in
hpcinfer.layers.quant.reference are what the tests check):

- AutoAWQ GEMM: ``qweight`` [in, out/8] with nibble i of pack j holding output 8j + [0, 2, 4,
  6, 1, 3, 5, 7][i]; ``qzeros`` [groups, out/8] packed the same way; ``scales`` fp16 [groups,
  out]; codes 0..15, w = (q - z) * s.
- GPTQ (AutoGPTQ / GPTQModel v1): ``qweight`` [in/8, out], nibble i of row j = input 8j + i;
  ``qzeros`` [groups, out/8], nibble i = output 8j + i, storing zero - 1 (checkpoint_format
  "gptq"); ``scales`` fp16 [groups, out]; ``g_idx`` [in] (a permutation's groups with
  desc_act).
- compressed-tensors pack-quantized: signed values + 8 packed along the input (``weight_packed``
  [out, in/8], nibble i = input 8j + i); ``weight_zero_point`` [out/8, groups] packed along the
  output; ``weight_scale`` [out, groups]; ``weight_shape``.
- FP8: e4m3 weights; block scales ``weight_scale_inv`` (HF fp8) or ``weight_scale``.

``build_quantized(family, fmt, out_dir)`` -> (quantized dir, oracle dir); FORMATS lists fmt.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# fmt -> (quantization_config, options for the quantizer)
FORMATS: dict[str, tuple[dict, dict]] = {
    "fp8_block": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                   "weight_block_size": [16, 16]}, {"block": (16, 16)}),
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                    "modules_to_not_convert": ["lm_head"]}, {"channel": True}),
    "ct_fp8_channel": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                        "config_groups": {"group_0": {
                            "targets": ["Linear"],
                            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                        "symmetric": True, "dynamic": False},
                            "input_activations": {"num_bits": 8, "type": "float",
                                                  "strategy": "token", "dynamic": True}}},
                        "ignore": ["lm_head"], "quantization_status": "compressed"},
                       {"channel": True}),
    "ct_fp8_tensor_static": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                              "config_groups": {"group_0": {
                                  "targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float",
                                              "strategy": "tensor", "symmetric": True,
                                              "dynamic": False},
                                  "input_activations": {"num_bits": 8, "type": "float",
                                                        "strategy": "tensor",
                                                        "dynamic": False}}},
                              "ignore": ["lm_head"], "quantization_status": "compressed"},
                             {"tensor": True, "input_scale": True}),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
             "version": "gemm"}, {"group": 32}),
    "gptq_sym": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                  "sym": True, "checkpoint_format": "gptq"}, {"group": 32, "sym": True}),
    "gptq_asym_desc_act": ({"quant_method": "gptq", "bits": 4, "group_size": 64,
                            "desc_act": True, "sym": False, "checkpoint_format": "gptq"},
                           {"group": 64, "desc_act": True}),
    "gptq_g128": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                   "sym": False, "checkpoint_format": "gptq"}, {"group": 128}),
    "ct_w4a16": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                  "config_groups": {"group_0": {
                      "targets": ["Linear"],
                      "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                  "group_size": 32, "symmetric": True, "dynamic": False}}},
                  "ignore": ["lm_head"], "quantization_status": "compressed"},
                 {"group": 32, "sym": True}),
    "ct_w4a16_asym": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                       "config_groups": {"group_0": {
                           "targets": ["Linear"],
                           "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                       "group_size": 32, "symmetric": False,
                                       "dynamic": False}}},
                       "ignore": ["lm_head"], "quantization_status": "compressed"},
                      {"group": 32}),
}

# Formats that need wider layers than the tiny default (hidden 64): group 128 must divide.
BASE_OVERRIDES: dict[str, dict] = {"gptq_g128": {"hidden_size": 128, "intermediate_size": 256}}


# ---- packers (the published layouts) ------------------------------------------------------

def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM packing of codes [rows, cols] (0..15) along the columns."""
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int32)
    for col in range(codes.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + AWQ_ORDER[i]].to(torch.int32) << (i * 4)
    return packed


def pack_sequential_cols(codes: torch.Tensor) -> torch.Tensor:
    """Nibble i of column j = column 8j + i (GPTQ qzeros, compressed-tensors weights)."""
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int32)
    for i in range(8):
        packed |= codes[:, i::8].to(torch.int32) << (i * 4)
    return packed


def pack_sequential_rows(codes: torch.Tensor) -> torch.Tensor:
    """Nibble i of row j = row 8j + i (GPTQ qweight, compressed-tensors zero points)."""
    return pack_sequential_cols(codes.t().contiguous()).t().contiguous()


# ---- quantizers: (tensors for the checkpoint, exact dequantized weight [out, in] fp32) -----

def quantize_fp8(weight: torch.Tensor, prefix: str, *, block=None, channel=False, tensor=False,
                 input_scale=False, scale_name="weight_scale"):
    w = weight.float()
    out, inp = w.shape
    if block is not None:
        b0, b1 = block
        blocks = torch.nn.functional.pad(w, (0, -inp % b1, 0, -out % b0))
        amax = blocks.reshape(blocks.shape[0] // b0, b0, -1, b1).abs().amax(dim=(1, 3))
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:out, :inp]
        stored = {f"{prefix}.{scale_name}": scale}
    elif channel:
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        full, stored = scale, {f"{prefix}.weight_scale": scale}
    else:
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(1)
        full, stored = scale, {f"{prefix}.weight_scale": scale}
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if input_scale:
        stored[f"{prefix}.input_scale"] = torch.tensor([0.05])
    return {f"{prefix}.weight": q, **stored}, q.float() * full


def _int4_codes(w: torch.Tensor, group: int, sym: bool, g_idx: torch.Tensor):
    """codes [out, in], zeros [out, groups], scales fp16 [out, groups] (scales rounded first)."""
    out, inp = w.shape
    groups = int(g_idx.max()) + 1
    scales = torch.empty(out, groups)
    zeros = torch.empty(out, groups, dtype=torch.int32)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scales[:, g] = cols.abs().amax(dim=1).clamp(min=1e-6) / 7.5
            zeros[:, g] = 8
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scales[:, g] = ((hi - lo) / 15).clamp(min=1e-6)
            zeros[:, g] = torch.round(-lo / scales[:, g]).clamp(0, 15).to(torch.int32)
    scales = scales.half()
    gi = g_idx.long()
    codes = torch.round(w / scales.float()[:, gi]) + zeros[:, gi]
    codes = codes.clamp(0, 15).to(torch.int32)
    deq = (codes - zeros[:, gi]).float() * scales.float()[:, gi]
    return codes, zeros, scales, deq


def _g_idx(inp: int, group: int, desc_act: bool, seed: int) -> torch.Tensor:
    size = inp if group == -1 else group
    if not desc_act:
        return torch.arange(inp, dtype=torch.int32) // size
    perm = torch.randperm(inp, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[perm] = torch.arange(inp, dtype=torch.int32) // size   # act order: groups permuted
    return g_idx


def quantize_int4(weight: torch.Tensor, prefix: str, layout: str, *, group: int, sym=False,
                  desc_act=False, seed=0):
    w = weight.float()
    g_idx = _g_idx(w.shape[1], group, desc_act, seed)
    codes, zeros, scales, deq = _int4_codes(w, group, sym, g_idx)
    if layout == "awq":
        tensors = {"qweight": pack_awq(codes.t().contiguous()),
                   "qzeros": pack_awq(zeros.t().contiguous()), "scales": scales.t().contiguous()}
    elif layout == "gptq":
        tensors = {"qweight": pack_sequential_rows(codes.t().contiguous()),
                   "qzeros": pack_sequential_cols((zeros - 1).t().contiguous()),  # v1: zero - 1
                   "scales": scales.t().contiguous(), "g_idx": g_idx}
    else:
        signed = codes - 8                        # compressed-tensors stores signed values
        tensors = {"weight_packed": pack_sequential_cols(signed + 8), "weight_scale": scales,
                   "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
        if not sym:
            tensors["weight_zero_point"] = pack_sequential_rows(zeros)
        if desc_act:
            tensors["weight_g_idx"] = g_idx
    return {f"{prefix}.{k}": v for k, v in tensors.items()}, deq


# ---- checkpoints ---------------------------------------------------------------------------

def _is_quantized(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return ".layers." in name and (leaf.endswith("proj") or leaf in ("fc1", "fc2"))


def _act_order_seed(prefix: str, seed: int) -> int:
    """Projections reading the same input (q/k/v, gate/up) share one act order, as GPTQ's
    (its order follows the input's Hessian)."""
    for parts, shared in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"),
                                                                    "gate_up")):
        for part in parts:
            if prefix.endswith(part):
                prefix = prefix.removesuffix(part) + shared
    return seed + zlib.crc32(prefix.encode())


def quantize_tensors(tensors: dict[str, torch.Tensor], fmt: str, seed: int = 0,
                     options: dict | None = None):
    """(quantized checkpoint tensors, oracle fp32 tensors) of a plain fp32 state dict.
    ``options`` update the format's quantizer options (e.g. {"group": 64})."""
    config, opts = FORMATS[fmt]
    opts = {**opts, **(options or {})}
    quantized, oracle = {}, {}
    for name, tensor in sorted(tensors.items()):
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and _is_quantized(prefix)):
            quantized[name] = oracle[name] = tensor
            continue
        if "group" in opts:
            layout = {"awq": "awq", "gptq": "gptq"}.get(config["quant_method"], "pack_quantized")
            q, deq = quantize_int4(tensor, prefix, layout, group=opts["group"],
                                   sym=opts.get("sym", False),
                                   desc_act=opts.get("desc_act", False),
                                   seed=_act_order_seed(prefix, seed))
        else:
            scale_name = "weight_scale_inv" if config["quant_method"] == "fp8" else "weight_scale"
            q, deq = quantize_fp8(tensor, prefix, block=opts.get("block"),
                                  channel=opts.get("channel", False),
                                  input_scale=opts.get("input_scale", False),
                                  scale_name=scale_name)
        quantized.update(q)
        oracle[name] = deq
    return quantized, oracle


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _write(out_dir: Path, src: Path, tensors: dict, quantization_config: dict | None) -> None:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, out_dir / path.name)
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))


def build_quantized(base_dir: str | Path, fmt: str, out_dir: str | Path, seed: int = 0,
                    quantization_config: dict | None = None, options: dict | None = None
                    ) -> tuple[Path, Path]:
    """Quantize the fp32 checkpoint ``base_dir`` as ``fmt``: (quantized dir, oracle dir) under
    out_dir. ``quantization_config`` overrides the format's (tests of bad configs, or with
    ``options`` a group size the model's widths need: bench/real_model_agreement.py)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    quantized, oracle = quantize_tensors(_read_tensors(base_dir), fmt, seed, options)
    config = FORMATS[fmt][0] if quantization_config is None else quantization_config
    _write(out_dir / fmt, base_dir, quantized, config)
    _write(out_dir / f"{fmt}-oracle", base_dir, oracle, None)
    return out_dir / fmt, out_dir / f"{fmt}-oracle"


def build_online_fp8_oracle(base_dir: str | Path, out_dir: str | Path) -> Path:
    """The fp32 model LLM(quantization="fp8") computes from ``base_dir``: per-channel e4m3
    weights, dequantized (written independently of hpcinfer's quantizer)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    oracle = {}
    for name, tensor in _read_tensors(base_dir).items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and _is_quantized(prefix):
            scale = (tensor.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
            tensor = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
        oracle[name] = tensor
    _write(out_dir, base_dir, oracle, None)
    return out_dir


# ---- bitsandbytes: written by transformers + bitsandbytes themselves -----------------------

BNB_CONFIGS = {
    "bnb_nf4_double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                       "bnb_4bit_use_double_quant": True},
    "bnb_fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "bnb_int8": {"load_in_8bit": True},
}


def build_bnb(base_dir: str | Path, fmt: str, out_dir: str | Path) -> tuple[Path, Path]:
    """(quantized dir, oracle dir) for ``fmt`` in BNB_CONFIGS: transformers quantizes the fp32
    checkpoint with bitsandbytes (on the CPU) and saves it as the hub's ``*-bnb-4bit``
    releases are saved; the oracle is that model dequantized by transformers
    (``model.dequantize()``, bitsandbytes' own dequantization) and saved plainly. Needs the
    ``bitsandbytes`` package (a test dependency)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    quantized, oracle = out_dir / fmt, out_dir / f"{fmt}-oracle"
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[fmt]),
        dtype=torch.float32, device_map="cpu")
    model.save_pretrained(str(quantized))
    model = AutoModelForCausalLM.from_pretrained(str(quantized), dtype=torch.float32,
                                                 device_map="cpu").dequantize()
    model.save_pretrained(str(oracle))
    for target in (quantized, oracle):   # the tokenizer and generation config, as _write does
        for src in base_dir.iterdir():
            if src.is_file() and src.suffix != ".safetensors" and src.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copy(src, target / src.name)
    return quantized, oracle


def build_online_nf4_oracle(base_dir: str | Path, out_dir: str | Path) -> Path:
    """The fp32 model LLM(quantization="bitsandbytes") computes from ``base_dir``: each decoder
    projection quantized to nf4 by bitsandbytes itself (blocks of 64, double-quantized absmax)
    and dequantized by it, written independently of hpcinfer's quantizer (needs
    ``bitsandbytes``)."""
    import bitsandbytes.functional as bnbf
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    oracle = {}
    for name, tensor in _read_tensors(base_dir).items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and _is_quantized(prefix):
            packed, state = bnbf.quantize_4bit(tensor.float(), blocksize=64, quant_type="nf4",
                                               compress_statistics=True)
            tensor = bnbf.dequantize_4bit(packed, state).float()
        oracle[name] = tensor
    _write(out_dir, base_dir, oracle, None)
    return out_dir


def pack_bnb_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One weight as transformers saves a bitsandbytes 4-bit nf4, double-quantized layer
    (suffix after the layer name -> tensor), without bitsandbytes: for the GPU tests, whose
    machine has no bitsandbytes (the CPU tests use build_bnb, i.e. bitsandbytes itself).
    Codes by hpcinfer.layers.quant.bnb's quantizer (bitsandbytes' reference algorithm)."""
    from hpcinfer.layers.quant import bnb
    nf4 = torch.tensor(bnb.NF4_VALUES)
    codes, absmax = bnb._quantize_blocks(weight, nf4, bnb.BLOCK)
    offset = absmax.mean()
    dyn = bnb.dynamic_map()
    nested_codes, nested = bnb._quantize_blocks(absmax - offset, dyn, bnb.NESTED_BLOCK)
    codes = codes.to(torch.uint8)
    state = {"quant_type": "nf4", "blocksize": bnb.BLOCK, "dtype": "float32",
             "shape": list(weight.shape), "nested_blocksize": bnb.NESTED_BLOCK,
             "nested_offset": offset.item(), "nested_dtype": "float32"}
    return {".weight": ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1),
            ".weight.absmax": nested_codes.to(torch.uint8), ".weight.quant_map": nf4,
            ".weight.nested_absmax": nested, ".weight.nested_quant_map": dyn.clone(),
            ".weight.quant_state.bitsandbytes__nf4":
                torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def build_bnb_nf4_packed(base_dir: str | Path, out_dir: str | Path) -> Path:
    """``base_dir`` with every decoder projection packed by pack_bnb_nf4, and a
    BitsAndBytesConfig quantization_config (nf4, double quantization)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    tensors = {}
    for name, tensor in _read_tensors(base_dir).items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and _is_quantized(prefix):
            tensors.update({prefix + suffix: t for suffix, t in pack_bnb_nf4(tensor).items()})
        else:
            tensors[name] = tensor
    _write(out_dir, base_dir, tensors, {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                        "bnb_4bit_quant_type": "nf4",
                                        "bnb_4bit_use_double_quant": True})
    return out_dir
