"""Images in, text out on one GPU (issue 24, workload V): hpcinfer next to transformers.

Builds a random-init Qwen2.5-VL checkpoint of a real shape offline (hpcinfer/testing/
vision_bench.py: config, bf16 weights shard by shard, a word-level tokenizer with Qwen's special
tokens, transformers' PIL image processor), makes seeded synthetic images, and runs each
engine in its own subprocess on the same prompts and images. Prints one line per engine and
appends rows to <out>/vision-<device>-<date>.json as each engine finishes.

    python bench/vision.py --out bench/results                   # workload V, both engines
    python bench/vision.py --workload VT --device cpu --out /tmp/v   # CPU plumbing run

Workloads:
  V   Qwen2.5-VL-7B shape, bf16, 500 synthetic 448x448 images (256 image tokens each), one
      short prompt per image in the model's chat format, 128 output tokens each
  VT  a tiny Qwen2.5-VL shape (the same structure: window + full attention blocks, M-RoPE),
      float32, 4 images of 112x112 (16 image tokens), 8 output tokens: CPU-sized

Every request ignores EOS, so both engines produce exactly the requested tokens (hpcinfer's
worker checks each output's length; its min_tokens stays 0: with ignore_eos and no stop tokens
it would ban nothing and would take rows off the sampler's plain-greedy path, as in
bench/throughput.py; transformers gets min_new_tokens = max_new_tokens and no EOS).

Both engines get the same processor: transformers' Qwen2_5_VLProcessor over its PIL image
processor (hpcinfer.testing.tiny_vision.qwen2_vl_image_processor), because the GPU machine
may lack torchvision, which transformers 5's AutoProcessor for Qwen2-VL needs. The processor
runs on the host inside each engine's timed region (hpcinfer: when a request is added;
transformers: per batch), as it would in a real job.

hpcinfer: one generate call over all images after a warm-up on other images (Triton's JIT
compiles are not timed); start-up (load + memory profile) is timed on its own. transformers:
static generate (sdpa) over left-padded batches of --hf-batch-size in image order;
--hf-images N times only the first N images and --hf-time-budget-s S stops after the batch
that passes S seconds: the row then says subset=true and how many images it timed
(``images``), and its tok/s are over those images.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import append_rows  # bench/results_file.py (this script's directory)
from gc_pauses import gc_pauses  # bench/gc_pauses.py
from throughput import device_slug, engine_importable, importable_env

log = logging.getLogger("bench.vision")
REPO = Path(__file__).resolve().parent.parent
GiB = 2 ** 30
ENGINES = ("hpcinfer", "transformers")

WORKLOADS = {
    # 500 x (256 image + ~40 text) prompt tokens fit the KV pool at once next to 16 GiB of
    # weights: every request is admitted in the first steps.
    "V": dict(shape="qwen2.5-vl-7b", dtype="bfloat16", num_images=500, image_size=448,
              output_tokens=128, max_num_seqs=512, max_num_batched_tokens=8192),
    "VT": dict(shape="qwen2.5-vl-tiny", dtype="float32", num_images=4, image_size=112,
               output_tokens=8, max_num_seqs=4, max_num_batched_tokens=64),
}
WARMUP_IMAGES, WARMUP_TOKENS = 8, 4


# --- inputs (the same in every subprocess: seeded) ---------------------------------------

def make_inputs(spec: dict, num: int | None = None, seed: int = 0) -> tuple[list, list[str]]:
    """(images, prompts) of a workload: seeded synthetic images, one prompt each."""
    from hpcinfer.testing.vision_bench import prompt_for, synthetic_images
    num = spec["num_images"] if num is None else num
    return synthetic_images(num, spec["image_size"], seed), [prompt_for(i) for i in range(num)]


def processor_for(ckpt: Path):
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor
    return qwen2_vl_image_processor(ckpt, "2.5")


def image_tokens_per_image(spec: dict, processor) -> int:
    images, _ = make_inputs(spec, 1)
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


# --- engines (each in its own subprocess) ------------------------------------------------

def run_hpcinfer(ckpt: Path, spec: dict, device: str, profile_run: bool = False,
                 trace: str | None = None, trace_images: int = 0,
                 sync_debug: bool = False) -> dict:
    import torch
    import transformers

    import hpcinfer
    from hpcinfer import LLM, SamplingParams
    processor = processor_for(ckpt)
    original = transformers.AutoProcessor.from_pretrained

    def from_pretrained(where, *args, **kwargs):   # this bench's processor for its checkpoint
        if os.path.realpath(str(where)) == os.path.realpath(str(ckpt)):
            return processor
        return original(where, *args, **kwargs)
    transformers.AutoProcessor.from_pretrained = from_pretrained

    per_image = image_tokens_per_image(spec, processor)
    max_model_len = -(-(per_image + 64 + spec["output_tokens"]) // 16) * 16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    llm = LLM(str(ckpt), dtype=spec["dtype"], max_model_len=max_model_len, device=device,
              max_num_seqs=spec["max_num_seqs"], gpu_memory_utilization=0.9,
              max_num_batched_tokens=spec["max_num_batched_tokens"])
    sync()
    startup_s = time.perf_counter() - t0
    runner = llm.llm_engine.runner
    profile = runner.memory_profile
    print(f"hpcinfer start-up: {startup_s:.1f} s; KV pool {runner.num_blocks} blocks"
          + (f"; {profile.describe()}" if profile else ""), flush=True)

    def requests(images, prompts):
        return [{"prompt": p, "multi_modal_data": {"image": im}}
                for p, im in zip(prompts, images)]

    warm_images, warm_prompts = make_inputs(spec, min(WARMUP_IMAGES, spec["num_images"]),
                                            seed=1)
    t1 = time.perf_counter()
    llm.generate(requests(warm_images, warm_prompts),
                 SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True),
                 use_tqdm=False)
    print(f"hpcinfer warm-up ({len(warm_images)} images): {time.perf_counter() - t1:.1f} s",
          flush=True)
    images, prompts = make_inputs(spec)
    params = SamplingParams(temperature=0, max_tokens=spec["output_tokens"], ignore_eos=True)
    stats = llm.llm_engine.stats
    before = {k: getattr(stats, k) for k in STEP_STATS}
    workers = llm.llm_engine.multimodal.workers   # multimodal/workers.py (None: threads)
    served = workers.num_served if workers is not None else 0
    sync()
    with gc_pauses() as pauses:
        start = time.perf_counter()
        outs = llm.generate(requests(images, prompts), params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - start
    print(f"hpcinfer gc pauses: {json.dumps(pauses)}", flush=True)
    steps = {k: round(getattr(stats, k) - before[k], 3) for k in STEP_STATS}
    print(f"hpcinfer steps on {len(images)} images: {json.dumps(steps)}", flush=True)
    preprocess = {"workers": workers.num_alive if workers is not None else 0,
                  "images_by_workers": (workers.num_served if workers is not None else 0)
                  - served}
    print(f"hpcinfer preprocessing: {json.dumps(preprocess)}", flush=True)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    num_in = sum(len(o.prompt_token_ids) for o in outs)
    row = _row(tokens, num_in, wall, startup_s, spec, per_image)
    row.update(engine_version=hpcinfer.__version__, max_num_seqs=spec["max_num_seqs"],
               max_num_batched_tokens=spec["max_num_batched_tokens"],
               num_preemptions=llm.llm_engine.num_preemptions,
               enable_prefix_caching=llm.llm_engine.config.enable_prefix_caching,
               kv_blocks=runner.num_blocks,
               activation_peak_gib=profile.activation_peak / GiB if profile else None,
               encoder_peak_gib=profile.encoder_peak / GiB if profile else None,
               engine_steps=steps, preprocess=preprocess, gc_pauses=pauses)
    if sync_debug and device == "cuda":
        row["sync_points"] = sync_points_generate(llm, requests(images, prompts), params, sync)
    if profile_run:
        row["profile"] = profile_generate(llm, requests(images, prompts), params, sync)
    if trace:
        n = trace_images or TRACE_IMAGES
        trace_generate(llm, requests(images[:n], prompts[:n]), params, sync, Path(trace))
    return row


def _profiled(llm, requests: list, params, sync):
    """(torch.profiler's record, wall seconds) of one generate under the profiler, the
    vision tower's calls as a named range (hpcinfer.encode_images). The prefix cache is
    cleared first: these prompts and images ran before and must be encoded again."""
    from torch.profiler import ProfilerActivity, profile, record_function
    model = llm.llm_engine.runner.model
    encode = model.encode_images

    def encode_images(inputs):
        with record_function("hpcinfer.encode_images"):
            return encode(inputs)

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if llm.llm_engine.device.type == "cuda" else [])
    model.encode_images = encode_images
    try:
        llm.reset_prefix_cache()
        sync()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            llm.generate(requests, params, use_tqdm=False)
            sync()
        return prof, time.perf_counter() - start
    finally:
        model.encode_images = encode


def sync_points_generate(llm, requests: list, params, sync) -> list[dict]:
    """The same generate again with torch's CUDA sync debug mode on: every place where the
    host waited for the GPU through a torch call (``.item()``, ``.tolist()``, ``nonzero``, a
    blocking copy), with how often, busiest first. Waits inside the driver (a copy from
    pageable memory queued with non_blocking=True) are not reported: layers/transfer.py."""
    import warnings

    import torch
    llm.reset_prefix_cache()
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate(requests, params, use_tqdm=False)
            sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts: dict = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{w.filename}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
    points = [{"where": k, "count": n} for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    print(f"sync points in one generate: {len(points)} places", flush=True)
    for p in points[:20]:
        print(f"  {p['count']:6d}x  {p['where']}", flush=True)
    return points


TRACE_IMAGES = 32   # a Chrome trace of more is too large to bring back from a GPU machine


def trace_generate(llm, requests: list, params, sync, path: Path) -> None:
    """A timeline of the first images (Chrome trace, gzip: chrome://tracing or Perfetto) to
    see where the GPU waits: the vision tower's calls are named ranges."""
    import gzip
    import shutil

    prof, _ = _profiled(llm, requests, params, sync)
    raw = path.with_suffix("")   # x.json.gz -> x.json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(f"trace of {len(requests)} images: {path} ({path.stat().st_size / 2**20:.1f} MiB)",
          flush=True)


STEP_STATS = ("num_steps", "num_decode_steps", "schedule_s", "prepare_s", "model_s",
              "sample_s", "postprocess_s")


def profile_generate(llm, requests: list, params, sync) -> dict:
    """The same generate again under torch.profiler (after the timed run, so the numbers
    above are not slowed by it): device time by kernel, and the device time of the vision
    tower's calls (a record_function range around encode_images). Printed and returned."""
    prof, wall = _profiled(llm, requests, params, sync)
    events = prof.key_averages()
    # (the range itself also shows as a device event spanning its kernels: not a kernel)
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"
                      and not e.key.startswith("hpcinfer.")),
                     key=lambda e: -e.self_device_time_total)
    span = next((e for e in events if e.device_type.name == "CUDA"
                 and e.key == "hpcinfer.encode_images"), None)
    device_s = sum(e.self_device_time_total for e in kernels) / 1e6
    encoder = next((e for e in events if e.key == "hpcinfer.encode_images"), None)
    top = [{"kernel": e.key[:90], "s": round(e.self_device_time_total / 1e6, 3),
            "calls": e.count} for e in kernels[:20]]
    result = {"wall_s": round(wall, 3), "device_kernel_s": round(device_s, 3),
              "encoder_device_s": round(encoder.device_time_total / 1e6, 3) if encoder
              else None, "encoder_calls": encoder.count if encoder else 0,
              # first to last kernel of each call, summed: what exceeds encoder_device_s is the
              # GPU idle inside the tower's calls (host work between its kernels)
              "encoder_span_s": round(span.self_device_time_total / 1e6, 3) if span else None,
              "top": top}
    print(f"profiled generate: wall {wall:.1f} s (profiler on), kernels {device_s:.2f} s of "
          f"device time, vision tower {result['encoder_device_s']} s of kernels spanning "
          f"{result['encoder_span_s']} s in {result['encoder_calls']} calls", flush=True)
    for t in top:
        print(f"  {t['s']:8.3f} s {t['calls']:7d}x  {t['kernel']}", flush=True)
    return result


def run_transformers(ckpt: Path, spec: dict, device: str, batch_size: int,
                     num_images: int | None, time_budget_s: float | None) -> dict:
    import torch
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration
    processor = processor_for(ckpt)
    processor.tokenizer.padding_side = "left"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(ckpt), dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa",
        device_map=device).eval()
    model.generation_config.eos_token_id = None   # ignore EOS
    sync()
    startup_s = time.perf_counter() - t0
    pad = processor.tokenizer.pad_token_id
    new = spec["output_tokens"]

    def generate(images, prompts, max_new):
        inputs = processor(text=prompts, images=images, padding=True,
                           return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad)
        width = inputs["input_ids"].shape[1]
        return out[:, width:].tolist(), int(inputs["attention_mask"].sum())

    warm_images, warm_prompts = make_inputs(spec, min(2, spec["num_images"]), seed=1)
    generate(warm_images, warm_prompts, WARMUP_TOKENS)
    images, prompts = make_inputs(spec, num_images)
    tokens, num_in = [], 0
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        out, n = generate(images[b:b + batch_size], prompts[b:b + batch_size], new)
        tokens += out
        num_in += n
        print(f"transformers: {len(tokens)} of {len(images)} images after "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
    sync()
    wall = time.perf_counter() - start
    row = _row(tokens, num_in, wall, startup_s, spec, image_tokens_per_image(spec, processor))
    row.update(engine_version=transformers.__version__, batch_size=batch_size,
               time_budget_s=time_budget_s)
    return row


def _row(tokens: list[list[int]], num_in: int, wall: float, startup_s: float, spec: dict,
         per_image: int) -> dict:
    import torch
    num_out = sum(map(len, tokens))
    on_gpu = torch.cuda.is_available()
    free, total = torch.cuda.mem_get_info() if on_gpu else (0, 0)
    return {"output_tok_s": num_out / wall, "total_tok_s": (num_out + num_in) / wall,
            "wall_s": wall, "startup_s": startup_s, "images": len(tokens),
            "images_total": spec["num_images"], "subset": len(tokens) < spec["num_images"],
            "image_size": spec["image_size"], "image_tokens_per_image": per_image,
            "output_tokens_per_image": spec["output_tokens"],
            "num_input_tokens": num_in, "num_output_tokens": num_out,
            "exact_tokens": all(len(t) == spec["output_tokens"] for t in tokens),
            "first_tokens": [t[0] if t else None for t in tokens],
            "peak_gpu_mem_gib": (total - free) / GiB,
            "processor": "Qwen2_5_VLProcessor over Qwen2VLImageProcessorPil (no torchvision)"}


def worker_main(args) -> None:
    spec = WORKLOADS[args.workload]
    if args.worker == "hpcinfer":
        row = run_hpcinfer(Path(args.ckpt), spec, args.device, args.profile, args.trace,
                           args.trace_images, args.sync_debug)
    else:
        row = run_transformers(Path(args.ckpt), spec, args.device, args.hf_batch_size,
                               args.hf_images, args.hf_time_budget_s)
    Path(args.result_file).write_text(json.dumps(row))


# --- driver ------------------------------------------------------------------------------

def run_engine(engine: str, args, ckpt: Path, env: dict) -> dict | None:
    """One engine's subprocess; its result dict, or None when it wrote none."""
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    result_file = Path(name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--workload",
           args.workload, "--ckpt", str(ckpt), "--result-file", str(result_file),
           "--device", args.device, "--hf-batch-size", str(args.hf_batch_size)]
    if args.profile:
        cmd.append("--profile")
    if args.sync_debug:
        cmd.append("--sync-debug")
    if args.trace:
        cmd += ["--trace", str(Path(args.trace).resolve()), "--trace-images",
                str(args.trace_images)]
    for flag, value in (("--hf-images", args.hf_images),
                        ("--hf-time-budget-s", args.hf_time_budget_s)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, env=env)
    text = result_file.read_text()
    result_file.unlink()
    if not text:
        print(f"{engine}: failed (exit {proc.returncode}) without a result", flush=True)
        return None
    return json.loads(text)


def agreement(a: list, b: list) -> float | None:
    """Share of the images both engines ran whose first generated token is equal."""
    n = min(len(a), len(b))
    return sum(1 for x, y in zip(a, b) if x is not None and x == y) / n if n else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="V", choices=sorted(WORKLOADS))
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--device", default="cuda", help="cpu: the tiny plumbing run (VT)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results dir")
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(),
                                                       "hpcinfer-bench"))
    p.add_argument("--hf-batch-size", type=int, default=256,
                   help="transformers: images per generate call (bench/throughput.py's 256)")
    p.add_argument("--hf-images", type=int, help="transformers: time only the first N images")
    p.add_argument("--hf-time-budget-s", type=float,
                   help="transformers: stop after the batch that passes this many seconds")
    p.add_argument("--label", default="", help="free text stored with every row")
    p.add_argument("--profile", action="store_true",
                   help="hpcinfer: after the timed run, the same run again under "
                        "torch.profiler (device time by kernel and of the vision tower)")
    p.add_argument("--trace", help="hpcinfer: write a Chrome trace (.json.gz) of a run of the "
                                   f"first {TRACE_IMAGES} images to this path")
    p.add_argument("--sync-debug", action="store_true",
                   help="hpcinfer: after the timed run, the same run again with torch's CUDA "
                        "sync debug mode: where the host waited for the GPU, with counts")
    p.add_argument("--trace-images", type=int, default=0,
                   help=f"images in the traced run (default {TRACE_IMAGES}; the whole "
                        "workload's trace is tens of MiB: read it with bench/trace_gaps.py "
                        "where it was written)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        worker_main(args)
        return
    import torch

    from hpcinfer.testing.vision_bench import write_qwen2_5_vl
    spec = WORKLOADS[args.workload]
    env = importable_env()
    if args.device == "cuda":
        device = torch.cuda.get_device_name(0)
    else:   # the tiny plumbing run: Triton kernels, if any run, interpreted
        import platform
        device, env["TRITON_INTERPRET"] = f"cpu-{platform.machine()}", "1"
    engines = []
    for e in (e.strip() for e in args.engines.split(",") if e.strip()):
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {e!r} (known: {', '.join(ENGINES)})")
        if engine_importable(e):
            engines.append(e)
        else:
            print(f"{e}: not importable here; skipped", flush=True)
    t0 = time.perf_counter()
    ckpt = write_qwen2_5_vl(Path(args.ckpt_root).resolve() / spec["shape"], spec["shape"],
                            dtype=spec["dtype"])
    if args.device == "cuda":
        torch.cuda.empty_cache()   # the weights were drawn on the GPU: free them for the engines
    print(f"workload {args.workload}: checkpoint {ckpt} ready in "
          f"{time.perf_counter() - t0:.1f} s; {spec['num_images']} images of "
          f"{spec['image_size']}x{spec['image_size']}, {spec['output_tokens']} output tokens "
          "each", flush=True)
    date = dt.date.today().isoformat()
    path = Path(args.out) / f"vision-{device_slug(device)}-{date}.json"
    firsts: dict[str, list] = {}
    done: dict[str, dict] = {}   # this run's results by engine
    for engine in engines:
        print(f"--- {engine} on workload {args.workload}", flush=True)
        result = run_engine(engine, args, ckpt, env)
        base = {"engine": engine, "workload": args.workload, "tp": 1, "device": device,
                "date": date, "model_shape": spec["shape"], "dtype": spec["dtype"],
                "label": args.label}
        if result is None:   # saved now: a later engine may hang
            append_rows(path, [{**base, "error": "no result", "output_tok_s": None,
                                "total_tok_s": None}])
            continue
        firsts[engine] = result.pop("first_tokens")
        if engine != "hpcinfer" and "hpcinfer" in firsts:
            result["first_token_agreement_vs_hpcinfer"] = agreement(firsts["hpcinfer"],
                                                                    firsts[engine])
        append_rows(path, [{**base, **result}])
        done[engine] = result
        subset = (f" (subset: {result['images']} of {result['images_total']} images)"
                  if result["subset"] else "")
        print(f"=== {engine} on {args.workload}: {result['output_tok_s']:.0f} output tok/s, "
              f"{result['total_tok_s']:.0f} total tok/s, wall {result['wall_s']:.1f} s, "
              f"start-up {result['startup_s']:.1f} s, {result['images']} images x "
              f"{result['image_tokens_per_image']} image tokens{subset}", flush=True)
    if "hpcinfer" in done and "transformers" in done:
        ratio = done["hpcinfer"]["output_tok_s"] / done["transformers"]["output_tok_s"]
        print(f"hpcinfer / transformers output tok/s on {args.workload}: {ratio:.1f}x",
              flush=True)
    print(f"rows in {path}", flush=True)


if __name__ == "__main__":
    main()
