"""Structured outputs on one GPU: workload A with every row JSON-constrained vs unconstrained.

Workload A (bench/throughput.py): the Llama-3.2-1B shape in bf16, 256 prompts x 256 random
input ids, 256 output tokens each, greedy, EOS ignored. The constrained run gives every row the
same JSON schema, one whose shortest valid output is longer than 256 tokens (an array of at
least 200 short strings), so every row is masked on every step and ends by length, as the
unconstrained rows do: the two runs produce the same number of tokens and the ratio of their
output tok/s is the cost of the masks. A second constrained run uses a small extraction schema
whose rows end by the grammar (finish_reason "stop"): every output must parse.

The bitmask needs a tokenizer with real byte-level tokens (the throughput bench's word-level
one has no "{"): --tokenizer names a directory with tokenizer.json + tokenizer_config.json
(SmolLM2's 49,152-token BPE works; the model keeps workload A's 128,256 logits, the extra ones
never allowed). Each schema is compiled in a short warm-up (its time is the row's compile_s),
as a job whose rows share a schema compiles it once.

json_extraction's rows end after ~80 tokens, which lowers output tok/s for reasons other
than the masks (prefill is a larger share, the batch thins out as rows end), so a last run,
free_same_lengths_as_json_extraction, gives the same prompts unconstrained, each row as many
tokens as its json_extraction row; json_extraction's vs_free_same_lengths is the ratio to
it.

Writes one row per run (free, json_long, json_extraction,
free_same_lengths_as_json_extraction) with the common result keys (engine, workload, tp,
output_tok_s, total_tok_s, device, date) to --out/structured-outputs-<device>-<date>.json, and
prints a host-time breakdown per step: mask (fill(), all of it), fill (xgrammar filling the
bitmasks, in it), accept (the matchers taking the sampled tokens), apply (launching the mask
on the logits), their sum loop (mask + accept + apply); other (the rest of the step's wall
time: the engine's own host work and waiting for the GPU); plus the engine's step-loop
timers. bench/structured_host.py measures the same host work without a GPU.

    python bench/structured_outputs.py --tokenizer DIR [--out DIR]
    python bench/structured_outputs.py --tokenizer DIR --device cpu --shape tiny \
        --num-prompts 64 --max-tokens 64 --out /tmp     # host-side profile without a GPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import WORKLOADS, write_checkpoint  # noqa: E402  (bench/throughput.py)

from hpcinfer.testing.llama_shapes import SHAPES  # noqa: E402

LONG_SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 200}},
    "required": ["items"], "additionalProperties": False}
EXTRACTION_SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["positive", "negative", "neutral"]},
    "score": {"type": "integer", "minimum": 1, "maximum": 5},
    "keywords": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 4}},
    "required": ["label", "score", "keywords"], "additionalProperties": False}


def build_model(root: Path, tokenizer_dir: Path, shape: str) -> Path:
    ckpt = write_checkpoint(root / "ckpt", SHAPES[shape])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, ckpt / name)
    return ckpt


def timed(llm, prompts, params, sync) -> tuple[list, float]:
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    return outs, time.perf_counter() - start


ENGINE_TIMERS = ("schedule_s", "prepare_s", "model_s", "sample_s", "postprocess_s")
# engine/structured.py's counters, all on the step loop: mask (fill(), all of it), fill
# (xgrammar's fills in it), accept, apply
STAGE_TIMERS = ("fill_s", "accept_s", "apply_s", "mask_s")
STAGE_COUNTS = ("num_mask_rows",)


def _counters(engine) -> dict:
    stats, stage = engine.stats, engine.structured
    out = {name: getattr(stats, name) for name in ENGINE_TIMERS}
    out.update(steps=stats.num_steps, mask_steps=stats.num_grammar_masks,
               mask_s=stats.grammar_mask_s)
    out.update({name: getattr(stage, name) if stage is not None else 0.0
                for name in STAGE_TIMERS + STAGE_COUNTS})
    return out


def watch_overlap(stage) -> dict:
    """Counts, on CUDA, how often the forward launched before a fill was already done when the
    fill started (the GPU idled before the fill: host work or a sync came first) and when it
    ended (the fill outlasted the forward). An event recorded at the fill's start follows
    that forward in the stream; query() never waits."""
    import torch
    counts = {"fills": 0, "forward_done_at_fill_start": 0, "forward_done_at_fill_end": 0}
    fill = stage.fill

    def watched(seqs):
        event = torch.cuda.Event()
        event.record()
        at_start = event.query()
        mask = fill(seqs)
        if mask is not None:
            counts["fills"] += 1
            counts["forward_done_at_fill_start"] += at_start
            counts["forward_done_at_fill_end"] += event.query()
        return mask

    stage.fill = watched
    return counts


def run(ckpt: Path, num_prompts: int, max_tokens: int, device: str,
        extra_pairs: int = 2) -> list[dict]:
    import numpy as np
    import torch
    from hpcinfer import LLM
    from hpcinfer.sampling_params import SamplingParams, StructuredOutputsParams
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llm = LLM(str(ckpt), dtype="bfloat16" if cuda else "float32", max_model_len=1024,
              max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9,
              enable_prefix_caching=False, device=device)
    vocab = len(llm.get_tokenizer())
    rng = np.random.default_rng(0)
    prompt_len = 256
    prompts = [{"prompt_token_ids": rng.integers(10, vocab, prompt_len).tolist()}
               for _ in range(num_prompts)]
    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    runs = (("free", None),
            ("json_long", StructuredOutputsParams(json=LONG_SCHEMA)),
            ("json_extraction", StructuredOutputsParams(json=EXTRACTION_SCHEMA)))
    # Warm-up: Triton compiles, and each schema compiles once (cached by its text), as a job
    # whose rows share a schema pays it once; the compile time is reported apart.
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
                 * num_prompts, use_tqdm=False)
    engine = llm.llm_engine
    compile_s = {}
    for name, so in runs[1:]:
        start = time.perf_counter()
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                 structured_outputs=so), use_tqdm=False)
        compile_s[name] = round(time.perf_counter() - start, 3)
    stage = engine.structured
    overlap = watch_overlap(stage) if cuda else None
    common = {"engine": "hpcinfer", "tp": 1,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "date": time.strftime("%Y-%m-%d")}
    extra = {"num_prompts": num_prompts, "max_tokens": max_tokens,
             "logits_vocab": engine.spec.vocab_size, "tokenizer_vocab": vocab,
             "mask_vocab": stage.mask_vocab, "fill_threads": stage.max_threads,
             "async_scheduling": engine.config.async_scheduling}
    rows = []
    for name, so in runs:
        params = free if so is None else SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=so)
        before = _counters(engine)
        overlap_before = dict(overlap or {})
        outs, wall = timed(llm, prompts, [params] * num_prompts, sync)
        after = _counters(engine)
        d = {k: after[k] - before[k] for k in after}
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        steps = d["steps"]
        row = {**common, "workload": f"A-structured-{name}",
               "output_tok_s": round(num_out / wall, 1),
               "total_tok_s": round((num_out + num_prompts * prompt_len) / wall, 1),
               "wall_s": round(wall, 3), "output_tokens": num_out, "steps": steps,
               "mask_steps": d["mask_steps"],
               "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs})}
        if d["mask_steps"]:
            row["mask_ms_per_step"] = round(1e3 * d["mask_s"] / d["mask_steps"], 3)
        if so is not None:
            row["compile_s"] = compile_s[name]
        # Host time per step (ms): the structured-outputs stage's parts; "loop", the step
        # loop's time in the stage (fill(), accepts, apply); "other", the rest of the wall
        # time (the engine's own host work and waiting for the GPU). The engine's timers
        # split the same wall time by phase of the step loop.
        step_ms = 1e3 * wall / steps
        parts = {k.removesuffix("_s"): 1e3 * d[k] / steps for k in STAGE_TIMERS}
        loop = parts["mask"] + parts["accept"] + parts["apply"]
        row["host_ms_per_step"] = {"step": round(step_ms, 3),
                                   **{k: round(v, 3) for k, v in parts.items()},
                                   "loop": round(loop, 3), "other": round(step_ms - loop, 3)}
        if d["mask_steps"]:
            row["mask_rows_per_step"] = round(d["num_mask_rows"] / d["mask_steps"], 1)
        row["engine_ms_per_step"] = {k.removesuffix("_s"): round(1e3 * d[k] / steps, 3)
                                     for k in ENGINE_TIMERS}
        if overlap and overlap["fills"] > overlap_before["fills"]:
            row["overlap"] = {k: overlap[k] - overlap_before[k] for k in overlap}
        # xgrammar's latest fill time per row on the step loop's thread (engine/structured.py
        # sizes the chunks of rows it fills on several threads by it)
        row["fill_us_per_row"] = round(1e6 * stage.fill_row_s, 2)
        if name == "json_extraction":   # json_long rows end by length, unfinished
            row["valid"] = sum(_parses(o.outputs[0].text) for o in outs)
            extraction_lengths = [len(o.outputs[0].token_ids) for o in outs]
        rows.append({**row, **extra})
        print(name, f"{row['output_tok_s']} tok/s, {steps} steps, host ms/step:",
              json.dumps(row["host_ms_per_step"]), "engine ms/step:",
              json.dumps(row["engine_ms_per_step"]), "overlap:", json.dumps(row.get("overlap")),
              flush=True)
    for row in rows[1:]:
        row["vs_free"] = round(row["output_tok_s"] / rows[0]["output_tok_s"], 3)
    rows.append(same_lengths_free(llm, prompts, extraction_lengths, sync, common, extra,
                                  prompt_len))
    extraction = next(r for r in rows if r["workload"] == "A-structured-json_extraction")
    extraction["vs_free_same_lengths"] = round(
        extraction["output_tok_s"] / rows[-1]["output_tok_s"], 3)
    # The ratio moved by a fifth from run to run on the H200s: json_extraction and its
    # same-lengths run again, alternating, in the same process (greedy: the same rows).
    ratios = [extraction["vs_free_same_lengths"]]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=EXTRACTION_SCHEMA))
    for _ in range(extra_pairs):
        outs, wall = timed(llm, prompts, [params] * num_prompts, sync)
        constrained = sum(len(o.outputs[0].token_ids) for o in outs) / wall
        free_row = same_lengths_free(llm, prompts, extraction_lengths, sync, common, extra,
                                     prompt_len)
        ratios.append(round(constrained / free_row["output_tok_s"], 3))
    extraction["vs_free_same_lengths_pairs"] = ratios
    extraction["vs_free_same_lengths_median"] = float(np.median(ratios))
    print("A-structured-json_extraction vs free rows of the same lengths:", ratios,
          "median", extraction["vs_free_same_lengths_median"], flush=True)
    return rows


def same_lengths_free(llm, prompts, lengths: list[int], sync, common: dict, extra: dict,
                      prompt_len: int) -> dict:
    """json_extraction's rows end by the grammar after ~80 tokens, so its output tok/s is
    lower than free's 256-token rows for reasons that are not the masks: prefill is a larger
    share of the run, and the batch thins out as rows end. This run has the same prompts,
    unconstrained, each row ending after as many tokens as its json_extraction row
    (max_tokens, EOS ignored): the ratio to it is the cost of the constraint alone."""
    from hpcinfer.sampling_params import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs, wall = timed(llm, prompts, params, sync)
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(lengths), "a same-lengths row did not run to its max_tokens"
    row = {**common, "workload": "A-structured-free_same_lengths_as_json_extraction",
           "output_tok_s": round(num_out / wall, 1),
           "total_tok_s": round((num_out + len(prompts) * prompt_len) / wall, 1),
           "wall_s": round(wall, 3), "output_tokens": num_out, **extra}
    print("free_same_lengths", f"{row['output_tok_s']} tok/s", flush=True)
    return row


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: profile the host side with --shape tiny")
    parser.add_argument("--shape", default=WORKLOADS["A"]["shape"], choices=sorted(SHAPES))
    parser.add_argument("--extra-pairs", type=int, default=2,
                        help="json_extraction and its same-lengths run again this many times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_model(Path(tmp), args.tokenizer, args.shape)
        rows = run(ckpt, args.num_prompts, args.max_tokens, args.device, args.extra_pairs)
    print(json.dumps(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    name = rows[0]["device"].lower().replace(" ", "-")
    path = args.out / f"structured-outputs-{name}-{rows[0]['date']}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
