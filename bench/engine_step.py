"""Engine step overhead and tiny-model throughput, next to transformers generate.

Prints the Python time the scheduler and the batch builder spend per decode step while 256
sequences run (target: < 1 ms), and tokens/s of our engine and of transformers ``generate``
on the same prompts in the same run. Appends rows to bench/results/engine_step-<date>.json
(keys: engine, workload, tp, output_tok_s, total_tok_s, device, date, step_overhead_ms).

    python bench/engine_step.py                      # tiny random llama, CPU
    python bench/engine_step.py --model /path/to/snapshot --device cuda --num-prompts 256
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from results_file import append_rows  # bench/results_file.py (this script's directory)

log = logging.getLogger("bench.engine_step")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir (default: a tiny random llama)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="for both engines")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--label", help="model name for the results (default: the --model path)")
    return p.parse_args()


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(6, min(vocab, 380), (n, length), generator=g).tolist()


def run_engine(model: str, device: str, dtype: str, prompts, max_tokens: int) -> dict:
    from hpcinfer import LLMEngine, SamplingParams
    engine = LLMEngine.from_kwargs(model, device=device, dtype=dtype, max_num_seqs=len(prompts),
                                   max_model_len=len(prompts[0]) + max_tokens + 16)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    # Warm-up (Triton compiles, allocator): a few requests through prefill and decode.
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"warmup-{i}", p, SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step(final_only=True)
    _sync(engine.device)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    schedule_ms, prepare_ms, num_out = [], [], 0
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=True):
            num_out += len(out.outputs[0].token_ids)
        last = engine.stats.last_step
        if last["is_decode"] and last["num_seqs"] == len(prompts):
            schedule_ms.append(last["schedule_s"] * 1e3)
            prepare_ms.append(last["prepare_s"] * 1e3)
    _sync(engine.device)
    wall = time.perf_counter() - start
    stats = engine.stats
    log.info("engine: %d steps; seconds: schedule %.3f, prepare %.3f, model %.3f, sample %.3f, "
             "postprocess %.3f", stats.num_steps, stats.schedule_s, stats.prepare_s,
             stats.model_s, stats.sample_s, stats.postprocess_s)
    num_prompt = sum(len(p) for p in prompts)
    overheads = [a + b for a, b in zip(schedule_ms, prepare_ms)]
    median = statistics.median
    return {"engine": "hpcinfer", "output_tok_s": num_out / wall,
            "total_tok_s": (num_out + num_prompt) / wall,
            "step_overhead_ms": median(overheads) if overheads else None,
            "step_overhead_ms_p90": (sorted(overheads)[int(0.9 * len(overheads))]
                                     if overheads else None),
            "schedule_ms": median(schedule_ms) if overheads else None,
            "prepare_ms": median(prepare_ms) if overheads else None,
            "num_decode_steps_measured": len(overheads), "wall_s": wall,
            "device": device_name(engine.device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_transformers(model: str, device: str, dtype: str, prompts, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(dev).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=dev)
    with torch.no_grad():  # warm-up
        hf.generate(ids[:4], attention_mask=torch.ones_like(ids[:4]), max_new_tokens=4,
                    do_sample=False, pad_token_id=0)
    _sync(dev)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=0)
    _sync(dev)
    wall = time.perf_counter() - start
    num_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"engine": "transformers", "output_tok_s": num_out / wall,
            "total_tok_s": (num_out + ids.numel()) / wall, "step_overhead_ms": None,
            "wall_s": wall, "device": device_name(dev)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from hpcinfer.testing.tiny import tiny_checkpoint
        model = str(tiny_checkpoint("llama"))
    prompts = make_prompts(args.num_prompts, args.prompt_len, 384)
    workload = f"{args.num_prompts}x(in{args.prompt_len},out{args.max_tokens})-greedy-{args.dtype}"
    rows = [run_engine(model, args.device, args.dtype, prompts, args.max_tokens)]
    if not args.skip_transformers:
        rows.append(run_transformers(model, args.device, args.dtype, prompts, args.max_tokens))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    for row in rows:
        row.update(workload=workload, tp=1, date=date,
                   model=args.label or ("tiny-llama" if args.model is None else args.model))
        overhead = row["step_overhead_ms"]
        print(f"{row['engine']:>12}  {workload}  output {row['output_tok_s']:9.1f} tok/s  "
              f"total {row['total_tok_s']:9.1f} tok/s  "
              + (f"scheduler+batch {overhead:.3f} ms/decode step (schedule "
                 f"{row['schedule_ms']:.3f} + prepare {row['prepare_ms']:.3f}; p90 "
                 f"{row['step_overhead_ms_p90']:.3f})" if overhead is not None else ""))
    path = append_rows(RESULTS / f"engine_step-{date}.json", rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
