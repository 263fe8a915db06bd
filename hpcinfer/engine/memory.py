"""GPU memory sizing for the KV pool: profile the largest step, give the KV cache the rest.

``gpu_memory_utilization`` bounds this process's share of the device. Out of that share come
(1) memory in use that PyTorch's allocator does not own (the CUDA context, cuBLAS workspaces,
other processes), (2) the weights and anything else allocated now, (3) the peak activations
of the largest step, measured by a real forward of ``max_num_batched_tokens`` tokens with no
KV cache plus the logits and sampler temporaries of ``max_num_seqs`` rows, and (4) a fixed
reserve for the decode CUDA graphs' private pool. The KV pool gets what is left.

For a model that takes images the profiled step starts as an image-heavy step does
(hpcinfer/multimodal/step.py): the vision encoder runs over dummy images filling the step's
encoder budget (``max_num_batched_tokens`` image tokens), and its output stays allocated
through the language model's forward, as the step's image rows do. So the peak covers
whichever is larger, the encoder's activations or the text step's on top of the image
embeddings. Not covered: one image larger than the whole budget (the scheduler runs it alone
in a step; Qwen2-VL's largest default image is 16,384 tokens): lower the processor's
``max_pixels`` or leave headroom with ``gpu_memory_utilization``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

GiB = 2 ** 30
# Decode graphs keep their own pool (activations of <= max_num_seqs rows, split-K scratch,
# and the LM head's fp32 logits when they take at most 192 MiB: cuda_graphs.py
# GRAPH_LOGITS_MAX_BYTES): ~100 MiB for a 1B model at 256 sequences (+125 MiB of logits),
# more for wide models; this is the headroom.
GRAPH_POOL_RESERVE_BYTES = 512 * 2 ** 20


@dataclass(frozen=True)
class MemoryProfile:
    total: int              # device memory, bytes
    non_torch: int          # used outside our allocator (context, other processes)
    allocated: int          # held by live tensors after profiling (the weights, mostly)
    activation_peak: int    # the profiled step's peak above `allocated`
    kv_budget: int          # what the KV pool may take
    encoder_peak: int = 0   # the vision encoder's own peak within that step (0: no images)

    def describe(self) -> str:
        encoder = (f" (vision encoder {self.encoder_peak / GiB:.2f} GiB)"
                   if self.encoder_peak else "")
        return (f"device {self.total / GiB:.1f} GiB; weights and buffers "
                f"{self.allocated / GiB:.2f} GiB; peak activations {self.activation_peak / GiB:.2f}"
                f" GiB{encoder}; outside PyTorch {self.non_torch / GiB:.2f} GiB; KV budget "
                f"{self.kv_budget / GiB:.2f} GiB")


@dataclass(frozen=True)
class StepPeak:
    total: int      # bytes the profiled step allocates above what was live before it
    encoder: int    # of which the vision encoder's own peak (0 without images)


def dummy_image_inputs(model, max_image_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Processor-shaped inputs (on the CPU, fp32 pixels, as the processor gives them) for
    images filling at most ``max_image_tokens`` placeholder tokens, at least one image.

    A model may define ``dummy_image_inputs(max_image_tokens)`` itself. Otherwise: a tower
    with a patch merger (``visual.merge_size``: Qwen2-VL, Qwen2.5-VL) gets one square grid of
    merge blocks, the largest within the budget (the worst case the scheduler allows); a
    fixed-size tower (``vision_tower.config.image_size``: LLaVA, Gemma 3) as many images as
    fit. ValueError for a model that is neither."""
    own = getattr(model, "dummy_image_inputs", None)
    if own is not None:
        return own(max_image_tokens)
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "merge_size"):
        side = max(1, math.isqrt(max_image_tokens)) * visual.merge_size   # patches per side
        patch_dim = visual.patch_embed.proj.weight[0].numel()   # C x T x P x P
        return [{"pixel_values": torch.randn(side * side, patch_dim),
                 "image_grid_thw": torch.tensor([[1, side, side]])}]
    config = getattr(getattr(model, "vision_tower", None), "config", None)
    if config is not None and hasattr(config, "image_size"):
        per_image = model.image_token_counts([{}])[0]
        shape = (1, getattr(config, "num_channels", 3), config.image_size, config.image_size)
        return [{"pixel_values": torch.randn(shape)}
                for _ in range(max(1, max_image_tokens // per_image))]
    raise ValueError(f"{type(model).__name__} takes images but the memory profile cannot "
                     "build dummy ones for it: give the model a "
                     "dummy_image_inputs(max_image_tokens) method")


def _dummy_text_step(vocab_size: int, num_tokens: int, max_num_seqs: int, device):
    """(input_ids, positions, metadata, cu_seqlens) of ``num_tokens`` tokens in up to
    ``max_num_seqs`` whole sequences; attention runs without a cache over each sequence."""
    from hpcinfer.layers.attention import AttentionMetadata
    num_seqs = max(1, min(max_num_seqs, num_tokens))
    lens = torch.full((num_seqs,), num_tokens // num_seqs, dtype=torch.int32)
    lens[: num_tokens % num_seqs] += 1
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    positions = torch.arange(num_tokens) - torch.repeat_interleave(cu[:-1].long(), lens.long())
    input_ids = torch.arange(num_tokens) % vocab_size
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        cu_seqlens_q=cu.to(device), seq_lens=lens.to(device),
        block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
        max_seqlen_q=int(lens.max()), max_seqlen_k=int(lens.max()), is_decode=False)
    return input_ids.to(device), positions.to(device), meta, cu.to(device)


@torch.inference_mode()
def profile_step_peak(model, vocab_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                      device: torch.device, image_inputs: list[dict] | None = None
                      ) -> StepPeak:
    """Peak bytes the largest step allocates on top of what is live now.

    With ``image_inputs`` (dummy_image_inputs) the vision encoder runs first and its output
    is held through the rest. The text part holds ``max_num_batched_tokens`` tokens split
    into up to ``max_num_seqs`` whole sequences, then samples one row per sequence as the
    engine would (fp32 logits, a log-softmax's worth of temporaries)."""
    input_ids, positions, meta, cu = _dummy_text_step(vocab_size, max_num_batched_tokens,
                                                      max_num_seqs, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    embeds, encoder = None, 0
    if image_inputs:
        embeds = model.encode_images([{k: v.to(device) for k, v in x.items()}
                                      for x in image_inputs])
        torch.cuda.synchronize(device)
        encoder = torch.cuda.max_memory_allocated(device) - before
    hidden = model.forward(input_ids, positions, [None] * model.spec.num_layers, meta)
    logits = model.compute_logits(hidden[cu[1:].long() - 1]).float()
    del hidden
    torch.log_softmax(logits, dim=-1).argmax(dim=-1)
    logits.clone()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del logits, embeds
    return StepPeak(max(peak, 0), max(encoder, 0))


def kv_budget_from(total: int, free: int, reserved: int, allocated: int, peak: int,
                   utilization: float) -> tuple[int, int]:
    """(memory outside PyTorch, KV budget) in bytes: the utilization share of the device less
    what is outside PyTorch, what is allocated, the step's peak and the graph pool reserve."""
    non_torch = max(total - free - reserved, 0)
    budget = int(total * utilization) - non_torch - allocated - peak - GRAPH_POOL_RESERVE_BYTES
    return non_torch, max(budget, 0)


def _profile_images(model, max_num_batched_tokens: int) -> list[dict] | None:
    if not getattr(model, "takes_images", False):
        return None
    try:
        return dummy_image_inputs(model, max_num_batched_tokens)
    except ValueError as e:
        log.warning("memory profile without the vision encoder: %s", e)
        return None


def kv_budget_bytes(model, vocab_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                    utilization: float, device: torch.device) -> MemoryProfile:
    images = _profile_images(model, max_num_batched_tokens)
    try:
        step = profile_step_peak(model, vocab_size, max_num_batched_tokens, max_num_seqs,
                                 device, images)
    except (TypeError, ValueError, RuntimeError) as e:
        # A pipeline stage past the first cannot run a whole forward from token ids alone:
        # estimate instead (activations of the widest layer, fp32 logits, with headroom).
        hidden = getattr(model.spec, "hidden_size", 4096)
        step = StepPeak(max_num_batched_tokens * hidden * 2 * 16
                        + 3 * min(max_num_seqs, max_num_batched_tokens) * vocab_size * 4, 0)
        log.warning("memory profile forward failed (%s); estimating peak activations as "
                    "%.2f GiB", e, step.total / GiB)
        torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    non_torch, budget = kv_budget_from(total, free, torch.cuda.memory_reserved(device),
                                       allocated, step.total, utilization)
    profile = MemoryProfile(total, non_torch, allocated, step.total, budget, step.encoder)
    log.info("memory profile (gpu_memory_utilization=%.2f): %s", utilization, profile.describe())
    return profile


# --- CPU: the job's memory limit, not the machine's free memory -------------------------------
# On a shared node the machine may have hundreds of GiB free while the job may use 4: Slurm's
# cgroup kills it past its --mem. So the pool is a fraction of what the *limit* leaves.

# Share of (limit - what this process already uses) the KV pool may take; the rest is for the
# step's activations and logits, the tokenizer, the input reader and the output writer.
CPU_KV_LIMIT_FRACTION = 0.25
# With no limit at all (a laptop, a bare LLM() on an interactive node) the pool takes at most
# this share of MemAvailable and this many bytes: CPU decoding is too slow to fill more.
CPU_KV_DEFAULT_CAP_BYTES = 4 * GiB
_NO_LIMIT = 1 << 60          # cgroup v1 writes "unlimited" as a page-aligned LONG_MAX


@dataclass(frozen=True)
class CpuMemory:
    """What the CPU KV pool was sized from; ``describe()`` goes to the log, ``as_dict()`` to
    the worker's metrics."""
    limit_bytes: int | None      # the smallest limit that applies to this process (None: none)
    limit_source: str            # where it comes from ("cgroup v1 ...", "SLURM_MEM_PER_NODE=...")
    used_bytes: int              # this process's resident memory when the pool was sized
    available_bytes: int         # what the pool and everything after it may still take
    kv_budget: int               # what the KV pool may take

    def describe(self) -> str:
        if self.limit_bytes is None:
            return (f"no memory limit found (no cgroup limit, no SLURM_MEM_*): KV budget "
                    f"{self.kv_budget / GiB:.2f} GiB = min({CPU_KV_LIMIT_FRACTION:.0%} of "
                    f"{self.available_bytes / GiB:.2f} GiB MemAvailable, "
                    f"{CPU_KV_DEFAULT_CAP_BYTES / GiB:.0f} GiB)")
        return (f"memory limit {self.limit_bytes / GiB:.2f} GiB ({self.limit_source}), this "
                f"process uses {self.used_bytes / GiB:.2f} GiB: KV budget "
                f"{self.kv_budget / GiB:.2f} GiB = {CPU_KV_LIMIT_FRACTION:.0%} of the "
                f"{self.available_bytes / GiB:.2f} GiB left")

    def as_dict(self) -> dict:
        return {"limit_bytes": self.limit_bytes, "limit_source": self.limit_source,
                "used_bytes": self.used_bytes, "available_bytes": self.available_bytes,
                "kv_budget_bytes": self.kv_budget}


def cpu_kv_budget(environ=None) -> CpuMemory:
    """The CPU KV budget under the tightest of the cgroup and Slurm limits (docs/worker.md)."""
    import os
    environ = os.environ if environ is None else environ
    limits = [x for x in (cgroup_memory_limit(), slurm_memory_limit(environ)) if x is not None]
    used = resident_bytes()
    if not limits:
        available = available_ram_bytes()
        budget = min(int(available * CPU_KV_LIMIT_FRACTION), CPU_KV_DEFAULT_CAP_BYTES)
        return CpuMemory(None, "", used, available, budget)
    limit, source = min(limits)
    available = max(limit - used, 0)
    return CpuMemory(limit, source, used, available, int(available * CPU_KV_LIMIT_FRACTION))


def slurm_memory_limit(environ) -> tuple[int, str] | None:
    """--mem (SLURM_MEM_PER_NODE, MiB) or --mem-per-cpu x this node's CPUs, when set."""
    per_node = environ.get("SLURM_MEM_PER_NODE", "")
    if per_node.isdigit() and int(per_node) > 0:
        return int(per_node) * 2**20, f"SLURM_MEM_PER_NODE={per_node}"
    per_cpu = environ.get("SLURM_MEM_PER_CPU", "")
    cpus = environ.get("SLURM_CPUS_ON_NODE") or environ.get("SLURM_CPUS_PER_TASK") or "1"
    if per_cpu.isdigit() and int(per_cpu) > 0 and cpus.isdigit():
        return (int(per_cpu) * int(cpus) * 2**20,
                f"SLURM_MEM_PER_CPU={per_cpu} x {cpus} CPUs")
    return None


def cgroup_memory_limit(proc_self: str = "/proc/self") -> tuple[int, str] | None:
    """The smallest memory limit on this process's own cgroup and its ancestors: v2
    ``memory.max`` or v1 ``memory.limit_in_bytes``. None when none is set or readable."""
    from pathlib import Path
    try:
        groups = Path(proc_self, "cgroup").read_text().splitlines()
        mounts = Path(proc_self, "mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in groups:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            version, name = "v2", "memory.max"
        elif "memory" in controllers.split(","):
            version, name = "v1", "memory.limit_in_bytes"
        else:
            continue
        for directory in _cgroup_dirs(mounts, version, path):
            value = _read_limit(directory / name)
            if value is not None:
                found.append((value, f"cgroup {version} {directory / name}"))
    return min(found) if found else None


def _cgroup_dirs(mounts: list[str], version: str, path: str):
    """The cgroup's directory and its ancestors up to the mount point, deepest first."""
    from pathlib import Path
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if (version, fstype) == ("v2", "cgroup2") or (
                version == "v1" and fstype == "cgroup" and "memory" in options):
            root, mount = fields[3], Path(fields[4])
            # Inside a container the mount shows only the namespace's subtree (root "/" when
            # /proc/self/cgroup already says "/"); a path outside it maps to the mount itself.
            rel = path[len(root):] if path.startswith(root) else ""
            directory = mount / rel.lstrip("/")
            while True:
                yield directory
                if directory == mount or mount not in directory.parents:
                    break
                directory = directory.parent
            return


def _read_limit(path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None          # "max" (v2) or v1's "unlimited"
    return int(text)


def resident_bytes() -> int:
    """This process's resident memory (VmRSS): the weights, torch, the tokenizer so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_ram_bytes() -> int:
    """MemAvailable: used only when no limit applies to this process."""
    import os
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
