"""The checkpoint's ``quantization_config`` read into a QuantSpec, and the checks both sides run.

Pure Python (no torch): ``hpcinfer validate`` on a login node (hpcinfer.compile.checkpoint) and
the engine (hpcinfer.layers.quant.apply_quantization) call the same functions, so a checkpoint
is refused with the same message before the job waits in the queue and before any tensor is
read. Formats (docs/quantization.md):

- ``fp8`` (transformers' fine-grained FP8): e4m3 ``weight`` plus block-wise
  ``weight_scale_inv`` [ceil(out/B0), ceil(in/B1)] for ``weight_block_size`` [B0, B1]; without a
  block size, one ``weight_scale`` per tensor (vLLM's serialized fp8).
- ``fbgemm_fp8``: e4m3 ``weight`` and per-channel ``weight_scale`` [out, 1].
- ``compressed-tensors``: ``float-quantized`` (e4m3 ``weight``, ``weight_scale`` per tensor,
  channel or block; optional static ``input_scale``) and ``pack-quantized`` (4-bit
  ``weight_packed``, ``weight_scale`` per group, optional ``weight_zero_point``, ``weight_g_idx``).
- ``awq`` (GEMM packing) and ``gptq`` (4-bit, sym or asym, ``desc_act`` with ``g_idx``).
- ``mxfp4`` (gpt-oss's released checkpoints): only the MoE experts are quantized, as
  ``mlp.experts.{gate_up_proj,down_proj}_blocks`` (uint8 [E, out, in/32, 16], two e2m1 codes a
  byte, low nibble first) and ``_scales`` (uint8 e8m0 [E, out, in/32], bias 127); they are
  dequantized to the model dtype at load (hpcinfer.layers.quant.mxfp4), no MXFP4 kernel.
- ``bitsandbytes`` (transformers' BitsAndBytesConfig: 4-bit nf4/fp4 with or without double
  quantization, and 8-bit LLM.int8): dequantized to the model dtype as the checkpoint is read
  (hpcinfer.layers.quant.bnb), no bitsandbytes kernel.
- ``LLM(quantization="fp8")`` on an unquantized checkpoint: online FP8 (per-channel weights).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SUPPORTED_QUANT_METHODS: tuple[str, ...] = ("awq", "bitsandbytes", "compressed-tensors",
                                             "fbgemm_fp8", "fp8", "gptq", "mxfp4")
SUPPORTED_TEXT = ("fp8 (block-wise or per-tensor), fbgemm_fp8, compressed-tensors "
                  "(float-quantized FP8, pack-quantized 4-bit), awq (4-bit GEMM), gptq (4-bit), "
                  "mxfp4 (gpt-oss experts, dequantized at load), bitsandbytes (4-bit nf4/fp4 "
                  "and 8-bit checkpoints, dequantized at load); "
                  "LLM(quantization=\"fp8\") also quantizes an unquantized checkpoint online, "
                  "and LLM(quantization=\"bitsandbytes\") rounds one to nf4")
INT4_GROUP_SIZES = (32, 64, 128, -1)   # -1: one group over all input features (per channel)
PACK = 8                               # 4-bit values per int32
MXFP4_BLOCK = 32                       # e2m1 values per e8m0 scale
MXFP4_ARCHITECTURES = ("GptOssForCausalLM",)
MXFP4_PROJECTIONS = ("gate_up_proj", "down_proj")


class QuantConfigError(ValueError):
    """A quantization_config (or LLM(quantization=...)) the engine cannot run."""


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's linear layers are quantized (one scheme for all of them).

    ``scheme``: "fp8_block", "fp8_channel", "fp8_tensor" (e4m3 weights, scales as named) or
    "int4" (W4A16, ``layout`` "awq", "gptq" or "pack_quantized"). ``online``: fp8 computed at load
    from an unquantized checkpoint.
    """
    method: str
    scheme: str
    block: tuple[int, int] | None = None
    static_input_scale: bool = False
    online: bool = False
    layout: str | None = None
    group_size: int = -1
    has_zeros: bool = False
    desc_act: bool = False
    gptq_zero_offset: int = 0       # old GPTQ stores zero - 1 (checkpoint_format "gptq")
    ignore: tuple[str, ...] = ()

    @property
    def is_fp8(self) -> bool:
        return self.scheme.startswith("fp8")

    @property
    def is_mxfp4(self) -> bool:
        return self.scheme == "mxfp4"

    @property
    def is_bnb(self) -> bool:
        return self.scheme in ("bnb4", "bnb8")

    def describe(self) -> str:
        """One line for logs and ``hpcinfer validate``."""
        if self.is_mxfp4:
            return ("mxfp4: MoE expert weights in MXFP4 (e2m1, one e8m0 scale per 32), "
                    "dequantized to the model dtype at load (no MXFP4 kernel: the experts take "
                    "as much memory as unquantized ones)")
        if self.is_bnb and self.online:
            return ("bitsandbytes (online: each decoder projection rounded to 4-bit nf4 with "
                    "double-quantized absmax at load, as bitsandbytes quantizes, then kept "
                    "dequantized in the model dtype)")
        if self.is_bnb:
            what = f"4-bit {self.layout}" if self.scheme == "bnb4" else "8-bit (LLM.int8)"
            return (f"bitsandbytes: {what} weights, dequantized to the model dtype at load (no "
                    "bitsandbytes kernel: the weights take as much memory as unquantized ones)")
        if self.online:
            return "fp8 (online: per-channel e4m3 weights computed at load)"
        if self.scheme == "fp8_block":
            return f"{self.method}: fp8 e4m3, block-wise scales {list(self.block)}"
        if self.is_fp8:
            return f"{self.method}: fp8 e4m3, per-{self.scheme[4:]} weight scales"
        group = "per channel" if self.group_size == -1 else f"group size {self.group_size}"
        return (f"{self.method}: 4-bit weights ({self.layout}, {group}, "
                f"{'asymmetric' if self.has_zeros else 'symmetric'}"
                f"{', desc_act' if self.desc_act else ''})")


def _error(method: str, what: str) -> QuantConfigError:
    return QuantConfigError(f"quantization {method}: {what}; hpcinfer supports {SUPPORTED_TEXT}")


def quant_spec_of(hf: dict, quantization: str | None = None) -> QuantSpec | None:
    """The QuantSpec of a config.json dict (None: unquantized), or QuantConfigError."""
    raw = hf.get("quantization_config")
    if not isinstance(raw, dict):
        text = hf.get("text_config")
        raw = text.get("quantization_config") if isinstance(text, dict) else None
    if not isinstance(raw, dict):
        if quantization in (None, "auto"):
            return None
        if quantization == "fp8":
            return QuantSpec(method="fp8", scheme="fp8_channel", online=True)
        if quantization == "bitsandbytes":   # vLLM's in-flight 4-bit: nf4, then dequantized
            return QuantSpec(method="bitsandbytes", scheme="bnb4", layout="nf4", online=True)
        raise _error(quantization, "needs a checkpoint quantized that way (config.json has no "
                                   "quantization_config); only \"fp8\" and \"bitsandbytes\" "
                                   "quantize online")
    method = str(raw.get("quant_method") or "unknown")
    if quantization not in (None, "auto", method):
        raise _error(str(quantization), f"the checkpoint is quantized with {method}: leave "
                                        "quantization unset to use the checkpoint's")
    parse = _PARSERS.get(method)
    if parse is None:
        raise _error(method, f"unknown quant_method {method!r}")
    return parse(raw)


def _ignore_list(raw: dict, key: str) -> tuple[str, ...]:
    value = raw.get(key) or ()
    return tuple(str(v) for v in value)


def _block(method: str, value) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise _error(method, f"weight_block_size {value!r} is not two positive integers")
    return int(value[0]), int(value[1])


def _parse_fp8(raw: dict) -> QuantSpec:
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _error("fp8", f"activation_scheme {scheme!r} is neither dynamic nor static")
    block = _block("fp8", raw.get("weight_block_size"))
    if block is not None and scheme == "static":
        raise _error("fp8", "block-wise weights with static activation scales")
    return QuantSpec(method="fp8", scheme="fp8_block" if block else "fp8_tensor", block=block,
                     static_input_scale=scheme == "static",
                     ignore=_ignore_list(raw, "modules_to_not_convert"))


def _parse_fbgemm(raw: dict) -> QuantSpec:
    return QuantSpec(method="fbgemm_fp8", scheme="fp8_channel",
                     ignore=_ignore_list(raw, "modules_to_not_convert"))


def _int4_common(method: str, bits, group_size) -> int:
    if bits != 4:
        raise _error(method, f"{bits}-bit weights (only 4-bit)")
    if group_size not in INT4_GROUP_SIZES:
        raise _error(method, f"group_size {group_size!r} (supported: "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))})")
    return int(group_size)


def _parse_awq(raw: dict) -> QuantSpec:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise _error("awq", f"version {version!r} (only the GEMM packing)")
    group = _int4_common("awq", raw.get("bits", raw.get("w_bit")),
                         raw.get("group_size", raw.get("q_group_size")))
    if not raw.get("zero_point", True):
        raise _error("awq", "zero_point false (AWQ GEMM checkpoints carry zero points)")
    return QuantSpec(method="awq", scheme="int4", layout="awq", group_size=group, has_zeros=True,
                     ignore=_ignore_list(raw, "modules_to_not_convert"))


def _parse_gptq(raw: dict) -> QuantSpec:
    group = _int4_common("gptq", raw.get("bits"), raw.get("group_size"))
    fmt = str(raw.get("checkpoint_format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise _error("gptq", f"checkpoint_format {fmt!r} (supported: gptq, gptq_v2)")
    return QuantSpec(method="gptq", scheme="int4", layout="gptq", group_size=group,
                     has_zeros=True, desc_act=bool(raw.get("desc_act", False)),
                     gptq_zero_offset=1 if fmt == "gptq" else 0,
                     ignore=_ignore_list(raw, "modules_to_not_convert"))


def _parse_compressed_tensors(raw: dict) -> QuantSpec:
    groups = raw.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _error("compressed-tensors", f"{len(groups)} config_groups (exactly one, "
                                           "targeting Linear, is supported)")
    group = next(iter(groups.values()))
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or raw.get("format")
    ignore = _ignore_list(raw, "ignore")
    if weights.get("type") == "float" and weights.get("num_bits") == 8:
        return _ct_float(weights, acts, fmt, ignore)
    if weights.get("type") == "int" and fmt == "pack-quantized":
        return _ct_int4(weights, acts, ignore)
    raise _error("compressed-tensors", f"format {fmt!r} with {weights.get('num_bits')}-bit "
                                       f"{weights.get('type')} weights")


def _ct_float(weights: dict, acts: dict | None, fmt, ignore) -> QuantSpec:
    method = "compressed-tensors"
    if fmt not in ("float-quantized", "naive-quantized", None):
        raise _error(method, f"format {fmt!r} for fp8 weights")
    strategy = weights.get("strategy")
    schemes = {"tensor": "fp8_tensor", "channel": "fp8_channel", "block": "fp8_block"}
    if strategy not in schemes:
        raise _error(method, f"fp8 weight strategy {strategy!r} (tensor, channel or block)")
    block = _block(method, weights.get("block_structure")) if strategy == "block" else None
    if strategy == "block" and block is None:
        raise _error(method, "block strategy without block_structure")
    static = isinstance(acts, dict) and not acts.get("dynamic", True)
    if static and acts.get("strategy") != "tensor":
        raise _error(method, f"static activation strategy {acts.get('strategy')!r} (tensor)")
    return QuantSpec(method=method, scheme=schemes[strategy], block=block,
                     static_input_scale=static, ignore=ignore)


def _ct_int4(weights: dict, acts: dict | None, ignore) -> QuantSpec:
    method = "compressed-tensors"
    if acts:
        raise _error(method, "4-bit weights with quantized activations")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise _error(method, f"4-bit weight strategy {strategy!r} (group or channel)")
    group = _int4_common(method, weights.get("num_bits"),
                         weights.get("group_size") if strategy == "group" else -1)
    actorder = weights.get("actorder")
    return QuantSpec(method=method, scheme="int4", layout="pack_quantized", group_size=group,
                     has_zeros=not weights.get("symmetric", True),
                     desc_act=actorder in ("group", True), ignore=ignore)


def _parse_mxfp4(raw: dict) -> QuantSpec:
    return QuantSpec(method="mxfp4", scheme="mxfp4",
                     ignore=_ignore_list(raw, "modules_to_not_convert"))


def _parse_bnb(raw: dict) -> QuantSpec:
    # transformers writes both load_in_4bit and _load_in_4bit (and the 8-bit pair)
    four = bool(raw.get("load_in_4bit", raw.get("_load_in_4bit")))
    eight = bool(raw.get("load_in_8bit", raw.get("_load_in_8bit")))
    ignore = _ignore_list(raw, "llm_int8_skip_modules")
    if four and not eight:
        kind = str(raw.get("bnb_4bit_quant_type", "fp4"))
        if kind not in ("nf4", "fp4"):
            raise _error("bitsandbytes", f"bnb_4bit_quant_type {kind!r} (nf4 or fp4)")
        return QuantSpec(method="bitsandbytes", scheme="bnb4", layout=kind, ignore=ignore)
    if eight and not four:
        return QuantSpec(method="bitsandbytes", scheme="bnb8", layout="int8", ignore=ignore)
    raise _error("bitsandbytes", "a quantization_config with neither (or both) of load_in_4bit "
                                 "and load_in_8bit")


_PARSERS = {"fp8": _parse_fp8, "fbgemm_fp8": _parse_fbgemm, "awq": _parse_awq,
            "gptq": _parse_gptq, "compressed-tensors": _parse_compressed_tensors,
            "mxfp4": _parse_mxfp4, "bitsandbytes": _parse_bnb}


# ---- which layers, and whether their shapes fit ------------------------------------------

def is_quantized_layer(spec: QuantSpec, hf_name: str) -> bool:
    """Whether the linear layer with HF module name ``hf_name`` (e.g.
    ``model.layers.0.self_attn.q_proj``) is quantized: decoder-layer projections not ignored."""
    if spec.is_mxfp4:
        return False     # MXFP4 quantizes only the MoE experts, never a linear layer
    leaf = hf_name.rpartition(".")[2]
    if ".layers." not in f".{hf_name}" or not (leaf.endswith("proj") or leaf in ("fc1", "fc2")):
        return False
    for pattern in spec.ignore:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], hf_name):
                return False
        elif pattern == hf_name or (spec.method != "compressed-tensors" and pattern in hf_name):
            return False
    return True


def shape_problem(spec: QuantSpec, leaf: str, out_pieces: list[int], in_size: int,
                  tp_size: int) -> str | None:
    """Why a layer's per-rank shapes do not fit the scheme, or None.

    ``out_pieces``: this rank's output features of each merged piece (q, k, v; gate, up);
    ``in_size``: this rank's input features.
    """
    if spec.online or spec.is_bnb or spec.scheme in ("fp8_channel", "fp8_tensor"):
        return None   # (bitsandbytes: dequantized before any slicing)
    if spec.scheme == "fp8_block":
        block_out, block_in = spec.block
        bad_out = [n for n in out_pieces if n % block_out] if (len(out_pieces) > 1 or tp_size > 1) \
            else []
        if bad_out or (tp_size > 1 and in_size % block_in):
            return (f"weight block size {list(spec.block)} does not divide {leaf} (output pieces "
                    f"{out_pieces}, {in_size} input features per rank at tensor parallel size "
                    f"{tp_size}): pick a tensor_parallel_size that keeps whole blocks per rank")
        return None
    # desc_act: any input may use any group (g_idx), so groups need not be whole per rank.
    group = in_size if spec.group_size == -1 or spec.desc_act else spec.group_size
    bad = [n for n in out_pieces if n % PACK] or in_size % PACK or in_size % group
    if bad:
        return (f"4-bit weights need {leaf}'s output pieces {out_pieces} and its {in_size} input "
                f"features per rank (tensor parallel size {tp_size}) to be multiples of {PACK}, "
                f"and the input features of group size {group}: pick a tensor_parallel_size "
                "that keeps whole groups per rank, or a checkpoint with a smaller group size")
    return None


def llama_like_layer_shapes(hf: dict, tp_size: int) -> list[tuple[str, list[int], int]]:
    """(leaf, per-rank output pieces, per-rank input) of a decoder layer's projections, from a
    Llama-shaped config.json (the login side's view of what the engine builds)."""
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    inter = int(hf.get("intermediate_size") or hf.get("ffn_dim") or 4 * hidden)
    kv_rank = max(kv_heads // tp_size, 1)
    q = heads * head_dim // tp_size
    return [("qkv_proj", [q, kv_rank * head_dim, kv_rank * head_dim], hidden),
            ("o_proj", [hidden], heads * head_dim // tp_size),
            ("gate_up_proj", [inter // tp_size, inter // tp_size], hidden),
            ("down_proj", [hidden], inter // tp_size)]


def config_problem(hf: dict, tp_size: int = 1, quantization: str | None = None) -> str | None:
    """The first reason the engine would refuse this config's quantization, or None."""
    try:
        spec = quant_spec_of(hf, quantization)
        if spec is None:
            return None
        if spec.is_mxfp4:
            return mxfp4_config_problem(hf)
        shapes = llama_like_layer_shapes(hf, tp_size)
    except QuantConfigError as exc:
        return str(exc)
    except (KeyError, TypeError, ValueError):
        return None   # not Llama-shaped: the engine checks its real layers
    for leaf, pieces, in_size in shapes:
        problem = shape_problem(spec, leaf, pieces, in_size, tp_size)
        if problem is not None:
            return f"quantization {spec.method}: {problem}"
    return None


def mxfp4_config_problem(hf: dict) -> str | None:
    """Why an MXFP4 config cannot load (not gpt-oss, or expert dims not whole blocks), or
    None. MXFP4 experts are dequantized before any tensor-parallel slicing, so the TP size
    adds no constraint here."""
    archs = [str(a) for a in hf.get("architectures") or ()]
    if not any(a in MXFP4_ARCHITECTURES for a in archs):
        found = ", ".join(archs) or "no listed architecture"
        return (f"quantization mxfp4: only gpt-oss's MoE experts "
                f"({', '.join(MXFP4_ARCHITECTURES)}) load from MXFP4 (dequantized at load); "
                f"this checkpoint is {found}: dequantize it with the tool that wrote it")
    for key in ("hidden_size", "intermediate_size"):
        value = hf.get(key)
        if isinstance(value, int) and value % MXFP4_BLOCK:
            return (f"quantization mxfp4: {key}={value} is not a multiple of the MXFP4 block "
                    f"size {MXFP4_BLOCK}: config.json does not match an MXFP4 checkpoint")
    return None


# ---- the checkpoint holds what the scheme needs ------------------------------------------

def required_suffixes(spec: QuantSpec) -> tuple[str, tuple[str, ...]]:
    """(main tensor suffix, suffixes that must sit beside it) of a quantized layer."""
    if spec.online:
        return "weight", ()
    if spec.is_fp8:
        scale = "weight_scale_inv" if spec.method == "fp8" and spec.block else "weight_scale"
        return "weight", (scale,) + (("input_scale",) if spec.static_input_scale else ())
    if spec.layout == "pack_quantized":
        return "weight_packed", (("weight_scale",)
                                 + (("weight_zero_point",) if spec.has_zeros else ())
                                 + (("weight_g_idx",) if spec.desc_act else ()))
    extra = ("g_idx",) if spec.layout == "gptq" else ()
    return "qweight", ("qzeros", "scales") + extra


def missing_tensor_problem(spec: QuantSpec, tensor_names: Iterable[str]) -> str | None:
    """Which quantized layers of a checkpoint lack a tensor the scheme needs, or None."""
    names = set(tensor_names)
    if spec.is_mxfp4:
        return _mxfp4_missing_problem(names)
    if spec.is_bnb:
        return _bnb_missing_problem(spec, names)
    main, beside = required_suffixes(spec)
    layers = {n.rpartition(".")[0] for n in names
              if n.endswith((".weight", ".qweight", ".weight_packed"))}
    missing: dict[str, list[str]] = {}
    for layer in sorted(layers):
        if not is_quantized_layer(spec, layer):
            continue
        for suffix in (main, *beside):
            if f"{layer}.{suffix}" not in names:
                missing.setdefault(suffix, []).append(layer)
    if not missing:
        return None
    suffix, layers_without = next(iter(missing.items()))
    return (f"quantization {spec.method}: the checkpoint has no {suffix} for "
            f"{len(layers_without)} quantized layer(s), e.g. {layers_without[0]}.{suffix}: it is "
            "incomplete, or its quantization_config does not describe its tensors")


def _bnb_missing_problem(spec: QuantSpec, names: set[str]) -> str | None:
    # Every layer with one part of a quantized weight needs all of them.
    if spec.scheme == "bnb4":
        marker = f".weight.quant_state.bitsandbytes__{spec.layout}"
        need = (".weight", ".weight.absmax", ".weight.quant_map", marker)
        layers = {n[:-len(suffix)] for n in names for suffix in need[1:] if n.endswith(suffix)}
        nested = (".weight.nested_absmax", ".weight.nested_quant_map")
        what = f"4-bit {spec.layout}"
    else:
        need, nested, what = (".weight", ".SCB"), (), "8-bit"
        layers = {n[:-len(".SCB")] for n in names if n.endswith(".SCB")}
    if not layers:
        return (f"quantization bitsandbytes: the checkpoint has no {what} tensors "
                f"({need[-1].lstrip('.')} beside a weight): its quantization_config does not "
                "describe its tensors")
    for layer in sorted(layers):
        wanted = need + (nested if any(f"{layer}{s}" in names for s in nested) else ())
        for suffix in wanted:
            if f"{layer}{suffix}" not in names:
                return (f"quantization bitsandbytes: the checkpoint has no {layer}{suffix} "
                        f"beside the other parts of its {what} weight: it is incomplete, or "
                        "its quantization_config does not describe its tensors")
    return None


_MXFP4_EXPERT_TENSOR = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)"
                                  r"(_blocks|_scales|)$")


def _mxfp4_missing_problem(names: set[str]) -> str | None:
    # Every experts module with any expert tensor needs both projections as blocks + scales.
    experts = sorted({m.group(1) for n in names if (m := _MXFP4_EXPERT_TENSOR.match(n))})
    if not experts:
        return ("quantization mxfp4: the checkpoint has no mlp.experts.*_blocks tensors: its "
                "quantization_config does not describe its tensors")
    for module in experts:
        for proj in MXFP4_PROJECTIONS:
            for suffix in ("_blocks", "_scales"):
                name = f"{module}.{proj}{suffix}"
                if name not in names:
                    return (f"quantization mxfp4: the checkpoint has no {name} (MXFP4 experts "
                            f"need {proj}_blocks and {proj}_scales): it is incomplete, or its "
                            "quantization_config does not describe its tensors")
    return None


def mxfp4_block_shape_problem(name: str, blocks_shape, scales_shape, num_experts: int,
                              out_features: int, in_features: int) -> str | None:
    """Why an expert projection's ``{name}_blocks``/``_scales`` shapes are not MXFP4 of
    [E, out, in], or None (the engine's loader and ``hpcinfer validate`` both ask)."""
    groups = in_features // MXFP4_BLOCK
    want_blocks = (num_experts, out_features, groups, MXFP4_BLOCK // 2)
    want_scales = (num_experts, out_features, groups)
    if tuple(blocks_shape) != want_blocks or tuple(scales_shape) != want_scales:
        return (f"quantization mxfp4: {name}_blocks is {list(blocks_shape)} and {name}_scales "
                f"{list(scales_shape)}, expected {list(want_blocks)} and {list(want_scales)} "
                f"({num_experts} experts, {out_features} x {in_features} weights in blocks of "
                f"{MXFP4_BLOCK}): does config.json match the weights?")
    return None


def mxfp4_shapes_problem(hf: dict, shapes: dict[str, list[int]]) -> str | None:
    """The first MXFP4 expert projection whose blocks/scales (``shapes``: tensor name -> shape,
    from the safetensors headers) do not fit config.json, or None."""
    try:
        experts, hidden = int(hf["num_local_experts"]), int(hf["hidden_size"])
        inter = int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None     # the engine checks its real layers
    for name in sorted(shapes):
        match = _MXFP4_EXPERT_TENSOR.match(name)
        if match is None or match.group(3) != "_blocks":
            continue
        base = name[:-len("_blocks")]
        scales = shapes.get(f"{base}_scales")
        if scales is None:
            continue    # missing_tensor_problem names it
        out, inp = (2 * inter, hidden) if match.group(2) == "gate_up_proj" else (hidden, inter)
        problem = mxfp4_block_shape_problem(base, shapes[name], scales, experts, out, inp)
        if problem is not None:
            return problem
    return None


# ---- what the job's GPU makes of it (hpcinfer validate) ----------------------------------

# Slurm GPU type names (resources.gpu_type, lower case) -> CUDA compute capability.
GPU_CAPABILITY: dict[str, tuple[int, int]] = {
    "v100": (7, 0), "t4": (7, 5), "rtx6000": (7, 5), "a100": (8, 0), "a30": (8, 0),
    "a10": (8, 6), "a40": (8, 6), "a6000": (8, 6), "rtx3090": (8, 6), "l4": (8, 9),
    "l40": (8, 9), "l40s": (8, 9), "rtx4090": (8, 9), "h100": (9, 0), "h200": (9, 0),
    "gh200": (9, 0), "b200": (10, 0)}
FP8_CAPABILITY = (8, 9)


def capability_of(gpu_type: str | None) -> tuple[int, int] | None:
    """Compute capability of a Slurm GPU type such as "a100" or "h100_80gb" (None: unknown)."""
    name = (gpu_type or "").lower().replace("-", "").replace(" ", "")
    for known in sorted(GPU_CAPABILITY, key=len, reverse=True):
        if name.startswith(known):
            return GPU_CAPABILITY[known]
    return None


def runtime_note(spec: QuantSpec, gpu_type: str | None, device: str = "cuda") -> str:
    """One line: the checkpoint's quantization and how this job's device will run it."""
    if spec.is_mxfp4 or spec.is_bnb:
        return spec.describe()
    if device == "cpu":
        return f"{spec.describe()}; on CPU the weights are dequantized once at load"
    capability = capability_of(gpu_type)
    if not spec.is_fp8:
        return f"{spec.describe()}; W4A16 Triton kernel on the GPU"
    if capability is None:
        return (f"{spec.describe()}; W8A8 on GPUs of compute capability >= 8.9 (H100, H200, "
                "L40S, L4), dequantized elsewhere (set resources.gpu_type to know which)")
    if capability < FP8_CAPABILITY:
        return (f"{spec.describe()}; {gpu_type} (compute capability {capability[0]}."
                f"{capability[1]}) has no FP8 matmul: the weights run dequantized to the model "
                "dtype, with no speedup and full-size weights in memory")
    return f"{spec.describe()}; W8A8 on {gpu_type} (compute capability {capability[0]}." \
           f"{capability[1]})"
