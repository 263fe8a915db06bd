"""Multi-GPU variants of bench/throughput.py: TP, PP and data-parallel replicas next to one GPU.

    python bench/throughput.py --workloads B --tp 2            # TP=1, then TP=2, one run
    python bench/throughput.py --workloads B --tp 2 --pp 2 --dp 2   # TP=1, TP=2, PP=2, DP=2
    python bench/throughput.py --workloads B --tp 2 --pp 2 --combine  # TP=1, then TP=2 x PP=2
    python bench/throughput.py --workloads T --device cpu --tp 2 --pp 2 --dp 2  # the plumbing

Every variant runs hpcinfer in its own subprocess(es) (``throughput.py --worker hpcinfer``) on
the same prompts, after a TP=1 baseline on one GPU in the same run:

- TP / PP: one ``LLM(tensor_parallel_size=, pipeline_parallel_size=)``; the engine spawns its
  other ranks (NCCL on GPUs, gloo on CPU), on the first tp x pp visible GPUs.
- DP: R independent engines at once, replica r pinned to its own GPUs with
  CUDA_VISIBLE_DEVICES and given every R-th prompt. Its throughput is all replicas' tokens
  over the slowest replica's wall time (each replica times its own generate call, after its
  own load and warm-up).

Rows carry tp, pp, dp, gpus, start-up time (load_s: LLM() until ready, spawned ranks, load
and graph capture included) and scaling_efficiency = output tok/s / (gpus x the baseline's).
Workload T (tiny shape, CPU-sized) exists so the plumbing can be run without a GPU.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THROUGHPUT = Path(__file__).resolve().parent / "throughput.py"


def variants(tp: int, pp: int, dp: int, combine: bool) -> list[dict]:
    """The layouts to run after the TP=1 baseline: each size > 1 on its own, or all at once."""
    for name, n in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"--{name} {n!r}: give a whole number of GPUs >= 1")
    if combine:
        return [{"tp": tp, "pp": pp, "dp": dp}]
    return [{"tp": tp if name == "tp" else 1, "pp": pp if name == "pp" else 1,
             "dp": dp if name == "dp" else 1} for name, n in (("tp", tp), ("pp", pp), ("dp", dp))
            if n > 1]


def replica_gpus(layout: dict, replica: int, visible: list[str]) -> list[str]:
    """The GPU ids (as CUDA_VISIBLE_DEVICES names them) of one replica of ``layout``."""
    per_replica = layout["tp"] * layout["pp"]
    need = per_replica * layout["dp"]
    if need > len(visible):
        raise ValueError(f"tp x pp x dp = {need} GPUs wanted but {len(visible)} are visible "
                         f"({','.join(visible) or 'none'}): use a machine with more GPUs or "
                         "smaller sizes")
    return visible[replica * per_replica:(replica + 1) * per_replica]


def combine_replicas(results: list[dict]) -> dict:
    """One row from R replicas: all tokens over the slowest replica's wall time."""
    wall = max(r["wall_s"] for r in results)
    num_out = sum(r["num_output_tokens"] for r in results)
    num_in = sum(r["num_input_tokens"] for r in results)
    return {"output_tok_s": num_out / wall, "total_tok_s": (num_out + num_in) / wall,
            "wall_s": wall, "load_s": max(r["load_s"] for r in results),
            "num_output_tokens": num_out,
            "replica_output_tok_s": [r["output_tok_s"] for r in results]}


def run_layout(args, workload: str, ckpt: Path, layout: dict, env: dict,
               visible: list[str]) -> dict:
    """Start the layout's replicas together, wait for all; the combined result row."""
    procs = []
    for replica in range(layout["dp"]):
        result_file = Path(tempfile.mkstemp(suffix=".json")[1])
        options = {"llm_kwargs": {"tensor_parallel_size": layout["tp"],
                                  "pipeline_parallel_size": layout["pp"]},
                   "device": args.device, "shard": [replica, layout["dp"]]}
        cmd = [sys.executable, str(THROUGHPUT), "--worker", "hpcinfer", "--workload", workload,
               "--ckpt", str(ckpt), "--result-file", str(result_file),
               "--parallel", json.dumps(options)]
        if args.num_prompts:
            cmd += ["--num-prompts", str(args.num_prompts)]
        replica_env = dict(env)
        if args.device == "cuda":
            replica_env["CUDA_VISIBLE_DEVICES"] = ",".join(replica_gpus(layout, replica, visible))
        procs.append((subprocess.Popen(cmd, env=replica_env), result_file))
    results, errors = [], []
    for replica, (proc, result_file) in enumerate(procs):
        proc.wait()
        text = result_file.read_text() if result_file.stat().st_size else ""
        result_file.unlink()
        if proc.returncode != 0 or not text:
            errors.append(f"replica {replica}: exit {proc.returncode}")
        else:
            results.append(json.loads(text))
    if errors:
        return {"error": "; ".join(errors), "output_tok_s": None, "total_tok_s": None}
    return combine_replicas(results)


def main(args, throughput) -> list[dict]:
    """``throughput.py --tp/--pp/--dp`` (``throughput`` is that module); returns the rows."""
    todo = variants(args.tp, args.pp, args.dp, args.combine)
    visible, device_name = _devices(args.device)
    env = throughput.importable_env()
    if args.device != "cuda":
        env["TRITON_INTERPRET"] = "1"
    date = dt.date.today().isoformat()
    rows = []
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        spec = throughput.WORKLOADS[workload]
        ckpt = throughput.write_checkpoint(Path(args.ckpt_root) / spec["shape"],
                                           throughput.SHAPES[spec["shape"]])
        baseline = None
        for layout in [{"tp": 1, "pp": 1, "dp": 1}, *todo]:
            name = "x".join(f"{k.upper()}={v}" for k, v in layout.items() if v > 1) or "TP=1"
            print(f"--- hpcinfer {name} on workload {workload}", flush=True)
            start = time.perf_counter()
            result = run_layout(args, workload, ckpt, layout, env, visible)
            gpus = layout["tp"] * layout["pp"] * layout["dp"]
            row = {"engine": "hpcinfer", "workload": workload, **layout, "gpus": gpus,
                   "device": device_name, "date": date, "model_shape": spec["shape"],
                   "dtype": "bfloat16", "label": args.label, **result,
                   "run_s": time.perf_counter() - start}
            if baseline is None:
                baseline = row.get("output_tok_s")
            if row.get("output_tok_s") and baseline:
                row["scaling_efficiency"] = row["output_tok_s"] / (gpus * baseline)
            rows.append(row)
            throughput._save([row], Path(args.out), device_name, date)
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    fmt = "{:<3} {:>3} {:>3} {:>3} {:>12} {:>12} {:>11} {:>10}"
    print(fmt.format("wl", "tp", "pp", "dp", "out tok/s", "total tok/s", "efficiency",
                     "start-up s"))
    for r in rows:
        if r.get("output_tok_s") is None:
            print(fmt.format(r["workload"], r["tp"], r["pp"], r["dp"], "error", "", "", ""))
            continue
        print(fmt.format(r["workload"], r["tp"], r["pp"], r["dp"], f"{r['output_tok_s']:.0f}",
                         f"{r['total_tok_s']:.0f}", f"{r.get('scaling_efficiency', 1):.2f}",
                         f"{r['load_s']:.1f}"))


def _devices(device: str) -> tuple[list[str], str]:
    if device != "cuda":
        import platform
        return [], f"cpu-{platform.machine()}"
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu with "
                         "--workloads T to run the tiny variant")
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ([n.strip() for n in names.split(",") if n.strip()] if names
               else [str(i) for i in range(torch.cuda.device_count())])
    return visible, torch.cuda.get_device_name(0)
