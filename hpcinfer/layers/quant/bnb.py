"""bitsandbytes checkpoints (transformers' ``BitsAndBytesConfig``, e.g. the hub's ``*-bnb-4bit``
releases), dequantized to the model dtype at load; and ``LLM(quantization="bitsandbytes")`` on
an unquantized checkpoint (vLLM's in-flight 4-bit), which rounds each decoder projection
through nf4 as bitsandbytes would quantize it (the weights a QLoRA adapter was trained
against) and keeps the result dequantized.

There is no bitsandbytes kernel here: each quantized linear weight is turned back into a
plain ``[out, in]`` tensor as the checkpoint stream is read (``BnbCheckpoint`` wraps the
loader's tensor iterator), so the model loads as an unquantized one and everything that
works there (tensor parallelism, LoRA, CUDA graphs) works the same. The weights then take
as much GPU memory as unquantized ones; what the 4-bit file saves is disk and download.

The formats, as transformers + bitsandbytes save them (checked against
``bitsandbytes.functional.dequantize_4bit`` in tests/quant/test_bnb.py):

- 4-bit (``load_in_4bit``, ``bnb_4bit_quant_type`` nf4 or fp4): ``<layer>.weight`` uint8
  ``[out * in / 2, 1]``, two codes a byte over the row-major flattened weight, the *high*
  nibble first; ``weight.quant_map`` float32 [16], the value of each code;
  ``weight.absmax``, one scale per ``blocksize`` (64) consecutive values; and
  ``weight.quant_state.bitsandbytes__<nf4|fp4>``, a uint8 tensor holding JSON
  (``quant_type``, ``blocksize``, ``dtype``, ``shape``, and with double quantization
  ``nested_blocksize``, ``nested_offset``). Double quantization stores ``absmax`` as uint8
  codes of ``weight.nested_quant_map`` [256] scaled by ``weight.nested_absmax`` per
  ``nested_blocksize`` codes, plus ``nested_offset``.
  value = quant_map[code] * absmax[block].
- 8-bit (``load_in_8bit``, LLM.int8): ``<layer>.weight`` int8 [out, in], ``<layer>.SCB``
  float32 [out] (each row's absmax), ``<layer>.weight_format`` (unused);
  value = weight * SCB / 127, computed as bitsandbytes does. (bitsandbytes' own 8-bit
  matmul also quantizes activations and splits outlier columns out; dequantized weights in
  the compute dtype do neither.)
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from hpcinfer.layers.quant.config import QuantConfigError, QuantSpec, is_quantized_layer

QUANT_STATE = ".weight.quant_state.bitsandbytes__"
# suffix after the layer name -> part of a 4-bit weight
FOUR_BIT_PARTS = {".weight": "packed", ".weight.absmax": "absmax",
                  ".weight.quant_map": "quant_map", ".weight.nested_absmax": "nested_absmax",
                  ".weight.nested_quant_map": "nested_quant_map"}
EIGHT_BIT_PARTS = {".weight": "int8", ".SCB": "scb"}
UNUSED_SUFFIXES = (".weight_format",)

# Online (LLM(quantization="bitsandbytes") on an unquantized checkpoint): the NF4 code of the
# QLoRA paper (bitsandbytes' table), blocks of 64, the absmax double-quantized to 8 bits in
# blocks of 256 with bitsandbytes' dynamic map.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCK, NESTED_BLOCK = 64, 256
# Values decoded (or rounded) at a time: the int64 codes and float32 temporaries of a 70B
# layer whole would take several GB of the GPU at load.
CHUNK = 1 << 24


def _read(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.materialize()


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                    state: dict, nested_absmax: torch.Tensor | None = None,
                    nested_quant_map: torch.Tensor | None = None) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as float32 of ``state["shape"]``, on ``packed``'s device."""
    shape, block = [int(v) for v in state["shape"]], int(state["blocksize"])
    numel = 1
    for v in shape:
        numel *= v
    device = packed.device
    if packed.dtype != torch.uint8 or packed.numel() * 2 != numel:
        raise ValueError(f"4-bit weight of shape {shape} needs {numel // 2} uint8 bytes, found "
                         f"{packed.numel()} {packed.dtype}")
    if numel % block:
        raise ValueError(f"4-bit weight of shape {shape} is not whole blocks of {block}")
    if "nested_blocksize" in state:
        if nested_absmax is None or nested_quant_map is None:
            raise ValueError("double-quantized absmax without nested_absmax/nested_quant_map")
        nested = int(state["nested_blocksize"])
        codes = nested_quant_map.to(device, torch.float32)[absmax.to(device).long()]
        groups = torch.arange(codes.numel(), device=device) // nested
        absmax = codes * nested_absmax.to(device, torch.float32)[groups] \
            + float(state["nested_offset"])
    absmax = absmax.to(device, torch.float32)
    if absmax.numel() != numel // block:
        raise ValueError(f"4-bit weight of shape {shape} in blocks of {block} needs "
                         f"{numel // block} absmax values, found {absmax.numel()}")
    flat, quant_map = packed.reshape(-1), quant_map.to(device, torch.float32)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    step = CHUNK - CHUNK % (2 * block)   # whole blocks, whole bytes
    for start in range(0, numel, step):
        part = flat[start // 2:(start + step) // 2]
        codes = torch.stack([part >> 4, part & 0x0F], dim=1).reshape(-1).long()   # high first
        scales = absmax[start // block:start // block + codes.numel() // block]
        out[start:start + codes.numel()] = (quant_map[codes].view(-1, block)
                                            * scales[:, None]).reshape(-1)
    return out.view(shape)


def dequantize_8bit(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """An LLM.int8 weight [out, in] as float32: weight * SCB / 127 per row."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or scb.shape != (weight.shape[0],):
        raise ValueError(f"8-bit weight {list(weight.shape)} {weight.dtype} with SCB "
                         f"{list(scb.shape)}: expected int8 [out, in] and float [out]")
    # bitsandbytes' own order and constant (float32 of 1/127), so the values are its bit for bit
    return weight.float() * scb.to(weight.device, torch.float32).view(-1, 1) * 7.874015718698502e-3


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``): 7
    decades of exponent, a shrinking fraction per decade, then 0 and 1; sorted, float32, on
    the CPU (built once: online quantization asks for it per layer; do not write to it)."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # float32 products, as bitsandbytes makes them (tensor times scalar)
        data += ((10 ** (-6 + i)) * means).tolist() + ((-(10 ** (-6 + i))) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _quantize_blocks(values: torch.Tensor, code: torch.Tensor, block: int):
    """bitsandbytes' reference blockwise quantizer: (codes [n], absmax [blocks]); each value
    scaled by its block's absmax and rounded to the nearest entry of the sorted ``code`` (a
    last partial block has its own absmax)."""
    flat = values.reshape(-1).float()
    full = flat.numel() - flat.numel() % block
    blocks = flat[:full].view(-1, block)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < flat.numel():   # (bitsandbytes divides here where it multiplies above)
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    return codes, absmax


def _expand(absmax: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Each of n values' block scale."""
    return absmax[torch.arange(n, device=absmax.device) // block]


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as bitsandbytes' ``quantize_4bit(w, blocksize=64, quant_type="nf4",
    compress_statistics=True)`` then ``dequantize_4bit`` give it back: float32, same shape
    (a weight whose size is not whole blocks of 64 at once; others a chunk at a time)."""
    nf4 = torch.tensor(NF4_VALUES, dtype=torch.float32, device=weight.device)
    if weight.numel() % BLOCK:
        codes, absmax = _quantize_blocks(weight, nf4, BLOCK)
        return (nf4[codes] * _expand(_double_quantized(absmax), weight.numel(), BLOCK)
                ).view(weight.shape)
    flat = weight.reshape(-1)
    absmax = flat.view(-1, BLOCK).abs().amax(dim=-1).float()   # (exact in any float dtype)
    stored = _double_quantized(absmax)
    bounds = (nf4[:-1] + nf4[1:]) / 2
    out = torch.empty(flat.numel(), dtype=torch.float32, device=weight.device)
    step = CHUNK - CHUNK % BLOCK
    for start in range(0, flat.numel(), step):
        blocks = flat[start:start + step].float().view(-1, BLOCK)
        rows = slice(start // BLOCK, start // BLOCK + blocks.shape[0])
        scaled = torch.clamp(blocks * (1.0 / absmax[rows].clamp(min=1e-38).view(-1, 1)), -1, 1)
        codes = torch.bucketize(scaled, bounds)
        out[start:start + blocks.numel()] = (nf4[codes] * stored[rows, None]).reshape(-1)
    return out.view(weight.shape)


def _double_quantized(absmax: torch.Tensor) -> torch.Tensor:
    """The block scales as a double-quantized nf4 weight stores them: less their mean, to 8
    bits of the dynamic map in blocks of 256, decoded, plus the mean."""
    offset = absmax.mean()
    dyn = dynamic_map().to(absmax.device)
    codes, nested = _quantize_blocks(absmax - offset, dyn, NESTED_BLOCK)
    return dyn[codes] * _expand(nested, absmax.numel(), NESTED_BLOCK) + offset


class BnbCheckpoint:
    """Wraps the loader's (name, tensor, file) stream: the parts of each quantized weight are
    held until the last one arrives, then one float32 ``<layer>.weight`` goes on in their
    place (dequantized on the model's device). Everything else passes through."""

    def __init__(self, model: torch.nn.Module, spec: QuantSpec):
        self.model, self.spec, self.four_bit = model, spec, spec.scheme == "bnb4"

    def __call__(self, tensors: Iterator) -> Iterator[tuple[str, torch.Tensor, Path]]:
        device = next(self.model.parameters()).device
        if self.spec.online:
            yield from self._round_to_nf4(tensors, device)
            return
        pending: dict[str, dict] = {}
        for name, tensor, path in tensors:
            if name.endswith(UNUSED_SUFFIXES):
                continue
            layer, part = self._part_of(name, tensor)
            if part is None:
                yield name, tensor, path
                continue
            parts = pending.setdefault(layer, {})
            parts[part] = _read(tensor).to(device) if part != "state" else _read(tensor)
            dense = self._dense(layer, parts)
            if dense is not None:
                del pending[layer]
                yield f"{layer}.weight", dense, path
        if pending:
            layer, parts = next(iter(pending.items()))
            raise QuantConfigError(
                f"quantization bitsandbytes: {layer} has only {sorted(parts)} of its "
                f"{'4' if self.four_bit else '8'}-bit weight: the checkpoint is incomplete")

    def _round_to_nf4(self, tensors: Iterator, device: torch.device):
        """Online: every decoder projection's weight rounded through nf4 (on ``device``)."""
        for name, tensor, path in tensors:
            if (name.endswith(".weight") and tensor.dtype.is_floating_point
                    and is_quantized_layer(self.spec, name[:-len(".weight")])):
                tensor = nf4_round_trip(_read(tensor).to(device))
            yield name, tensor, path

    def _part_of(self, name: str, tensor) -> tuple[str, str | None]:
        if self.four_bit:
            if QUANT_STATE in name:
                return name.split(QUANT_STATE)[0], "state"
            for suffix, part in FOUR_BIT_PARTS.items():
                # a plain float .weight (norms, embeddings) is not a packed one
                if name.endswith(suffix) and (part != "packed" or tensor.dtype == torch.uint8):
                    return name[:-len(suffix)], part
        else:
            for suffix, part in EIGHT_BIT_PARTS.items():
                if name.endswith(suffix) and (part != "int8" or tensor.dtype == torch.int8):
                    return name[:-len(suffix)], part
        return name, None

    def _dense(self, layer: str, parts: dict) -> torch.Tensor | None:
        """The dequantized weight once every part is in, else None."""
        try:
            if not self.four_bit:
                if parts.keys() < {"int8", "scb"}:
                    return None
                return dequantize_8bit(parts["int8"], parts["scb"])
            if not parts.keys() >= {"packed", "absmax", "quant_map", "state"}:
                return None
            state = json.loads(bytes(parts["state"].reshape(-1).tolist()).decode())
            if "nested_blocksize" in state and not parts.keys() >= {"nested_absmax",
                                                                   "nested_quant_map"}:
                return None
            return dequantize_4bit(parts["packed"], parts["absmax"], parts["quant_map"], state,
                                   parts.get("nested_absmax"), parts.get("nested_quant_map"))
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise QuantConfigError(f"quantization bitsandbytes: {layer}: {exc}") from None
