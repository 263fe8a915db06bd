"""LoRA throughput (issue 23): workload A with its rows spread evenly over N rank-r adapters
vs the same rows without LoRA, one process, one GPU. The target is >= 80% of the no-LoRA
output tok/s with 4 rank-16 adapters on every target (q/k/v/o/gate/up/down).

    python bench/lora.py                          # workload A, 4 adapters of rank 16
    python bench/lora.py --out "$OUT"             # results elsewhere than bench/results
    python bench/lora.py --enforce-eager          # both runs without CUDA graphs
    python bench/lora.py --workload T --device cpu   # the CPU-sized plumbing run
    python bench/lora.py --reps 3 --tiles-from "$OUT"/kernels-*.json   # + tuned launches
    python bench/lora.py --rounds 3 --reps 3 --shrink separate,auto  # both shrinks

``--tiles-from`` reads a ``bench/kernel_bench.py --only lora_tiles`` sweep, picks for each kernel
(shrink, expand) and decode size (<= 64 rows, <= 512 rows) the launch config with the least
summed time over the swept layer shapes, and runs the LoRA engine a second time with those
launches (replacing kernels.lora's config functions for that run only, as the sweep does), so
one GPU call measures the default launches and the tuned ones against the same baseline.
Mind the order: on an H200 (2026-12-03) a second LoRA engine in the same process ran 11%
faster than the first with the very same launches (docs/lora.md), so compare the tuned run
with a second run of the defaults, not with the first.

Decode runs in CUDA graphs by default on a GPU, the LoRA kernels inside them; each row
records whether graphs were used and how many steps replayed one. Adapters are random PEFT
directories written directly (adapter_config.json + safetensors, no peft needed). Rows go to
<out>/lora-<device>-<date>.json (engine hpcinfer, workload "A-lora<N>x<r>" and "A" for the
baseline). Not run on a GPU yet (docs/lora.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import append_rows  # noqa: E402  (bench/results_file.py)
from throughput import (RESULTS, WORKLOADS, device_slug, make_requests,  # noqa: E402
                        max_model_len_for, shape_of, write_checkpoint)

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(out_dir: Path, config: dict, rank: int, seed: int) -> Path:
    """A random rank-``rank`` LoRA on every projection of a Llama config, in PEFT's layout."""
    import torch
    from safetensors.torch import save_file
    from hpcinfer.lora.base_check import base_sizes
    sizes, gen = base_sizes(config), torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for block, names in TARGETS.items():
            for name in names:
                fan_in, fan_out = sizes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) \
                    / fan_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) \
                    / rank ** 0.5 * 0.1
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": [n for names in TARGETS.values() for n in names]}))
    return out_dir


def pick_tiles(sweep_json: Path) -> dict:
    """{"shrink"|"expand": {64|512: config}}: per kernel and decode-size bucket, the swept
    config (checked against the default's output) with the least time summed over shapes."""
    rows = json.loads(Path(sweep_json).read_text())
    totals: dict = {}
    for row in rows:
        kernel = row.get("kernel", "")
        if not kernel.endswith(":sweep") or not kernel.startswith("lora_"):
            continue
        kind = kernel.removeprefix("lora_").removesuffix(":sweep")
        bucket = 64 if int(row["shape"].split()[0]) <= 64 else 512
        key = json.dumps(row["config"], sort_keys=True)
        ok = row.get("ms") is not None and (row.get("rel_err") or 0) < 2e-2
        entry = totals.setdefault((kind, bucket), {}).setdefault(key, [0.0, True])
        entry[0] += row["ms"] if ok else 0.0
        entry[1] &= ok
    picked: dict = {}
    for (kind, bucket), configs in totals.items():
        usable = {k: t for k, (t, ok) in configs.items() if ok}
        if usable:
            picked.setdefault(kind, {})[bucket] = json.loads(min(usable, key=usable.get))
    return picked


def use_tiles(tiles: dict):
    """Replace kernels.lora's launch-config functions by the ``tiles`` table for decode-sized
    calls (bf16/fp16 only; other calls keep the defaults). Returns a function that undoes it."""
    from hpcinfer.kernels import lora as mod
    shrink0, expand0 = mod._shrink_config, mod._expand_config

    def bucket(num_tokens):
        return 64 if num_tokens <= 64 else 512 if num_tokens <= 512 else None

    def shrink(num_tokens, k, num_slots, block_pr, elem_size=2):
        cfg = tiles.get("shrink", {}).get(bucket(num_tokens))
        if cfg is None or elem_size != 2:
            return shrink0(num_tokens, k, num_slots, block_pr, elem_size)
        return dict(cfg)

    def expand(num_tokens, n):
        cfg = tiles.get("expand", {}).get(bucket(num_tokens))
        return dict(cfg) if cfg is not None else expand0(num_tokens, n)
    mod._shrink_config, mod._expand_config = shrink, expand

    def undo():
        mod._shrink_config, mod._expand_config = shrink0, expand0
    return undo


def timed_run(ckpt: Path, requests, spec: dict, device: str, adapters: list[Path],
              rank: int = 16, enforce_eager: bool = False, reps: int = 1,
              shrink: str = "auto") -> dict:
    import os

    import torch
    os.environ["HPCINFER_LORA_SHRINK"] = shrink   # read as the LoRA layers are made
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.lora.request import LoRARequest
    lora_kwargs = (dict(enable_lora=True, max_loras=len(adapters),
                        max_lora_rank=rank) if adapters else {})
    llm = LLM(str(ckpt), dtype="bfloat16" if device == "cuda" else "float32",
              max_model_len=max_model_len_for(requests), max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=False, device=device, enforce_eager=enforce_eager,
              **lora_kwargs)
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    per_row = [loras[i % len(loras)] for i in range(len(requests))] if loras else None
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in requests]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
                 * len(prompts), use_tqdm=False, lora_request=per_row)   # warm-up (compiles)
    sync()
    walls = []
    for _ in range(reps):   # the median rep counts (one rep is ~1 s on an H200)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_row)
        sync()
        walls.append(time.perf_counter() - start)
    wall = sorted(walls)[len(walls) // 2]
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    engine = llm.llm_engine
    graphs = engine.runner.graphs
    how = {"cuda_graphs": graphs is not None,
           "num_graph_replays": graphs.num_replays if graphs is not None else 0,
           "num_slot_loads": engine.lora.num_slot_loads if engine.lora is not None else 0}
    if engine.lora is not None:
        how["shrink"] = shrink
        how["stacked_layers"] = sum(layer.stacked for layer in engine.lora.layers)
        how["lora_layers"] = len(engine.lora.layers)
    del llm, engine, graphs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"output_tok_s": num_out / wall, "wall_s": wall, "rep_wall_s": walls,
            "num_output_tokens": num_out,
            "total_tok_s": (num_out + sum(len(p) for p, _ in requests)) / wall, **how}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median output tok/s, with every round's tok/s beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tok_s"])
    return {**ordered[(len(ordered) - 1) // 2],
            "round_output_tok_s": [r["output_tok_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="A", choices=("A", "T"))
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs, in both runs (default: graphs on a GPU)")
    parser.add_argument("--reps", type=int, default=1, help="timed reps per run (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="engines of each kind, alternating which goes first (no LoRA, "
                             "LoRA, then LoRA, no LoRA, ...): a later engine in a process ran "
                             "up to 11%% faster on the H200 (2026-12-03), which favoured the "
                             "second; the medians over rounds are reported")
    parser.add_argument("--shrink", default="separate",
                        help="how the LoRA layers compute the shrink (HPCINFER_LORA_SHRINK): "
                             "separate (the default), auto, stacked, or several "
                             "comma-separated to run a LoRA engine of each in every round "
                             "(e.g. separate,auto)")
    parser.add_argument("--tiles-from", help="a bench/kernel_bench.py lora_tiles sweep (JSON): "
                        "also run LoRA with the launches it picks")
    parser.add_argument("--out", default=str(RESULTS), help="results dir")
    args = parser.parse_args()
    import torch
    spec = WORKLOADS[args.workload]
    requests = make_requests(args.workload)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", shape_of(spec["shape"]))
        config = json.loads((ckpt / "config.json").read_text())
        adapters = [write_adapter(Path(tmp) / f"a{i}", config, args.rank, seed=i)
                    for i in range(args.num_adapters)]
        run = dict(enforce_eager=args.enforce_eager, reps=args.reps)
        modes = args.shrink.split(",")
        kinds = [("none", [])] + [(mode, adapters) for mode in modes]
        runs: dict = {kind: [] for kind, _ in kinds}
        for r in range(args.rounds):   # round r starts with kind r (mod the kinds)
            for kind, with_adapters in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                runs[kind].append(timed_run(ckpt, requests, spec, args.device, with_adapters,
                                            args.rank, shrink=kind if with_adapters
                                            else "auto", **run))
        base = _median_run(runs["none"])
        by_mode = {mode: _median_run(runs[mode]) for mode in modes}
        lora = by_mode[modes[0]]
        tuned = None
        if args.tiles_from:
            tiles = pick_tiles(Path(args.tiles_from))
            print(f"tuned LoRA launches: {json.dumps(tiles)}", flush=True)
            undo = use_tiles(tiles)
            try:
                tuned = timed_run(ckpt, requests, spec, args.device, adapters, args.rank,
                                  shrink=modes[0], **run)
            finally:
                undo()
            tuned["tiles"] = tiles
    graphs = "CUDA graphs" if lora["cuda_graphs"] else "eager"
    print(f"no LoRA {base['output_tok_s']:.0f} output tok/s; decode {graphs} "
          f"({base['num_graph_replays']} replays without LoRA)", flush=True)
    for mode, row in by_mode.items():
        print(f"{args.num_adapters} adapters of rank {args.rank}, shrink {mode} "
              f"({row['stacked_layers']}/{row['lora_layers']} layers stacked): "
              f"{row['output_tok_s']:.0f} ({100 * row['output_tok_s'] / base['output_tok_s']:.1f}%"
              f"); {row['num_graph_replays']} replays, {row['num_slot_loads']} adapter loads",
              flush=True)
    if args.rounds > 1:
        print("rounds (round r starts with kind r of: no LoRA, " + ", ".join(modes) + "): "
              + "; ".join(f"{kind} " + ", ".join(f"{t:.0f}" for t in
                                                 _median_run(runs[kind])["round_output_tok_s"])
                          for kind in runs), flush=True)
    date = dt.date.today().isoformat()
    common = dict(engine="hpcinfer", tp=1, device=device_name, date=date)
    common["rounds"] = args.rounds
    rows = [{**common, **base, "workload": args.workload}]
    for mode, row in by_mode.items():
        suffix = "" if len(modes) == 1 else f"-{mode}"
        rows.append({**common, **row,
                     "workload": f"{args.workload}-lora{args.num_adapters}x{args.rank}{suffix}",
                     "pct_of_no_lora": 100 * row["output_tok_s"] / base["output_tok_s"]})
    if tuned is not None:
        tuned_ratio = tuned["output_tok_s"] / base["output_tok_s"]
        print(f"tuned launches: {tuned['output_tok_s']:.0f} ({100 * tuned_ratio:.1f}%)",
              flush=True)
        rows.append({**common, **tuned, "pct_of_no_lora": 100 * tuned_ratio,
                     "workload": f"{args.workload}-lora{args.num_adapters}x{args.rank}-tuned"})
    if args.device == "cuda":   # CPU plumbing runs are not results
        append_rows(Path(args.out) / f"lora-{device_slug(device_name)}-{date}.json", rows)


if __name__ == "__main__":
    main()
