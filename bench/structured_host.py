"""The host side of a JSON-constrained decode step, without a GPU: what structured outputs
cost the step loop's thread per step.

Reproduces the host work of bench/structured_outputs.py's json_long run (workload A, every
row constrained by its LONG_SCHEMA, async scheduling; ``--schema extraction``: its
json_extraction objects, in an array so that rows never end) on the CPU: SmolLM2's tokenizer
(--tokenizer, e.g. .whl/tok) over workload A's 128,256 logits, 256 rows, the engine's own
StructuredOutputs, TokenAppender and detokenizers, called in the order of
LLMEngine._step_async for a batch with constrained rows:

  step t launched                 InFlight + placeholders
  launch step t+1's forward       stand-in: --other-ms of pure-Python work (the engine's
                                  schedule + prepare + launch: 1.6 ms a step on the H200
                                  host, bench/results/structured-outputs-run2-*), releasing
                                  the GIL every --release-every-us in a small torch op as
                                  the engine's torch calls do (0: never)
  read step t's tokens, append    StructuredOutputs.accept_tokens, then TokenAppender.append
                                  per row (detokenize, stop checks), as LLMEngine._postprocess
  fill step t+1's mask            StructuredOutputs.fill
  sample                          not timed (the GPU's work): each row takes a random token
                                  among those its mask allows, as a random model's argmax does

``host_ms_per_step`` holds the step loop thread's time per step without the sampling
stand-in (``step``: the median over the timed steps, ``step_p10`` its 10th percentile,
``cpu_step`` the process's CPU time, all threads), the same for the rows unconstrained
(``free_step``), their difference (``structured``), and the stage's counters per step
(``fill``: xgrammar's fills, ``accept``: the accepts). Written as one row to
--out/structured-host-cpu-<date>.json; as a host-only harness has no GPU step,
``output_tok_s`` is the rows x steps/s that the host time alone would allow (rows * 1000 /
host_ms_per_step["step"]), ``host_steps_per_s`` says the same per step, and ``total_tok_s``
equals ``output_tok_s`` (no prompt is processed).

    python bench/structured_host.py --tokenizer .whl/tok [--rows 256] [--steps 64]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import append_rows  # noqa: E402  (bench/results_file.py)
from structured_outputs import EXTRACTION_SCHEMA, LONG_SCHEMA  # noqa: E402  (the GPU bench's)

LOGITS_VOCAB = 128256   # workload A's logits (Llama-3.2-1B); the mask covers the tokenizer's
PROMPT_LEN = 16
# json_long: the GPU bench's json_long rows (costly fill states: length-bounded strings);
# extraction: its json_extraction objects (cheap states, ~5 us a row), repeated in an array
# so that rows never end within the timed steps.
SCHEMAS = {"long": LONG_SCHEMA,
           "extraction": {"type": "array", "items": EXTRACTION_SCHEMA, "minItems": 1000}}


def busy_python(ms: float, release_every_us: float = 0.0) -> None:
    """Pure-Python work for ``ms`` milliseconds, holding the GIL all along; or, with
    ``release_every_us``, releasing it that often for a moment (a small torch op), as the
    engine's own work does in its torch calls."""
    import torch
    end = time.perf_counter() + ms / 1e3
    x, scratch = 0, torch.zeros(16)
    next_release = time.perf_counter() + release_every_us / 1e6
    while (now := time.perf_counter()) < end:
        for i in range(50):
            x += i
        if release_every_us and now >= next_release:
            scratch.add_(1.0)
            next_release = now + release_every_us / 1e6


class AllowedTokens:
    """Picks, for each row, a uniformly random token among those its bitmask allows."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def pick(self, bitmask, num_rows: int) -> list[int]:
        words = bitmask[:num_rows].numpy().view(np.uint8)
        allowed = np.unpackbits(words, axis=1, bitorder="little")
        tokens = []
        for row in allowed:
            ids = np.flatnonzero(row)
            tokens.append(int(ids[self.rng.integers(len(ids))]))
        return tokens


def make_rows(tokenizer, structured, grammar, num_rows: int, max_tokens: int, seed: int,
              schema: dict):
    from hpcinfer.engine.detokenizer import IncrementalDetokenizer
    from hpcinfer.engine.params import SamplingParams
    from hpcinfer.engine.sequence import Sequence
    from hpcinfer.sampling_params import StructuredOutputsParams
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=schema))
    seqs = []
    for i in range(num_rows):
        prompt = rng.integers(10, len(tokenizer), PROMPT_LEN).tolist()
        seq = Sequence(str(i), 0, prompt, params, i)
        seq.detok = IncrementalDetokenizer(tokenizer, prompt)
        if grammar is not None:
            structured.start(seq, grammar)
        seqs.append(seq)
    return seqs


def run_steps(tokenizer, structured, grammar, args) -> dict:
    """Time ``args.steps`` steady-state steps (after ``args.warmup``), in the engine's order."""
    import torch

    from hpcinfer.engine.inflight import InFlight
    from hpcinfer.engine.token_appender import TokenAppender
    appender = TokenAppender(tokenizer, 1 << 20, frozenset([tokenizer.eos_token_id]))
    seqs = make_rows(tokenizer, structured, grammar, args.rows, args.warmup + args.steps + 1,
                     args.seed, SCHEMAS[args.schema])
    picker = AllowedTokens(args.seed)
    free_mask = torch.full((args.rows, structured.mask_vocab // 32), -1, dtype=torch.int32)
    # the first step's mask (a prefill step: nothing to read back yet)
    mask = structured.fill(seqs) if grammar is not None else None
    tokens = picker.pick(mask.bitmask if mask is not None else free_mask, args.rows)
    before = _stage_counters(structured)
    step_s, cpu_s = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            before, step_s, cpu_s = _stage_counters(structured), [], []
        t0, c0 = time.perf_counter(), time.process_time()
        # LLMEngine._step_async: the step is launched, its rows get placeholders
        flight = InFlight.launch(seqs, torch.tensor(tokens), None)
        for seq in seqs:
            seq.add_placeholder()
        # the next call: schedule, prepare, launch the forward
        busy_python(args.other_ms, args.release_every_us)
        for seq in seqs:             # _resolve_inflight
            seq.drop_placeholder()
        tokens = flight.token_list()
        if grammar is not None and hasattr(structured, "accept_tokens"):
            structured.accept_tokens(seqs, tokens)   # LLMEngine._postprocess
        for seq, token in zip(seqs, tokens):
            appender.append(seq, token, None, None, structured)
        assert not any(s.finish_reason for s in seqs), "a row ended: raise --steps' room"
        mask = structured.fill(seqs) if grammar is not None else None
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
        tokens = picker.pick(mask.bitmask if mask is not None else free_mask, args.rows)
    after = _stage_counters(structured)
    out = {k: 1e3 * (after[k] - before[k]) / args.steps for k in after}
    out["median"] = 1e3 * float(np.median(step_s))
    out["p10"] = 1e3 * float(np.percentile(step_s, 10))
    out["cpu"] = 1e3 * float(np.median(cpu_s))
    return out


def _stage_counters(structured) -> dict:
    names = ("fill_s", "accept_s")
    return {name.removesuffix("_s"): getattr(structured, name, 0.0) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--other-ms", type=float, default=1.6,
                        help="the engine's own host work per step (schedule, prepare, launch)")
    parser.add_argument("--release-every-us", type=float, default=0.0,
                        help="the stand-in releases the GIL this often (0: never, the worst "
                             "case for the background job)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the run (default: Python's 5 ms)")
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="long")
    parser.add_argument("--threads", type=int, default=None,
                        help="fill threads (default: the engine's, every core of the process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a note for the result row")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)

    from hpcinfer.engine.structured import StructuredOutputs
    from hpcinfer.sampling_params import StructuredOutputsParams
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    structured = StructuredOutputs(tokenizer, LOGITS_VOCAB, {tokenizer.eos_token_id},
                                   torch.device("cpu"), max_threads=args.threads)
    grammar = structured.compile(StructuredOutputsParams(json=SCHEMAS[args.schema]))
    free = run_steps(tokenizer, structured, None, args)
    constrained = run_steps(tokenizer, structured, grammar, args)
    host_ms = constrained["median"]
    breakdown = {"step": round(host_ms, 3), "step_p10": round(constrained["p10"], 3),
                 "free_step": round(free["median"], 3), "free_step_p10": round(free["p10"], 3),
                 "structured": round(host_ms - free["median"], 3),
                 "cpu_step": round(constrained["cpu"], 3), "free_cpu_step": round(free["cpu"], 3),
                 **{k: round(constrained[k], 3) for k in ("fill", "accept")},
                 "other_engine_work": args.other_ms}
    print(f"{args.rows} rows, {structured.max_threads} fill threads, {os.cpu_count()} cores: "
          f"host ms/step {json.dumps(breakdown)}", flush=True)
    output_tok_s = round(args.rows * 1e3 / host_ms, 1)
    workload = "json_long" if args.schema == "long" else "json_extraction_array"
    row = {"engine": "hpcinfer", "workload": f"A-structured-{workload}-host", "tp": 1,
           "output_tok_s": output_tok_s, "total_tok_s": output_tok_s,
           "host_steps_per_s": round(1e3 / host_ms, 2),
           "device": f"cpu ({len(os.sched_getaffinity(0))} cores, {socket.gethostname()})",
           "date": time.strftime("%Y-%m-%d"), "rows": args.rows, "steps": args.steps,
           "fill_threads": structured.max_threads, "mask_vocab": structured.mask_vocab,
           "logits_vocab": LOGITS_VOCAB, "host_ms_per_step": breakdown,
           "release_every_us": args.release_every_us,
           "structured_ms_per_step": breakdown["structured"],
           # other processes share small VMs: a load above the core count inflates every
           # time here, so compare runs made one after the other, not across sessions
           "load_avg_1min": round(os.getloadavg()[0], 2), "label": args.label}
    path = append_rows(args.out / f"structured-host-cpu-{row['date']}.json", [row], indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
