"""The step loop's host time per decode step, without a GPU: what the engine's Python costs
when the model costs nothing.

LLMEngine with async scheduling (as on a GPU) over ``--rows`` greedy rows of a checkpoint
(default: a tiny random llama and its byte-level BPE tokenizer; ``--model`` any checkpoint,
e.g. the SmolLM2 test model), with ModelRunner.run replaced by constant logits (a few random
[rows, vocab] tensors in turn, so rows take changing tokens): what is left is scheduling,
building the batch, sampling's host side, reading tokens back and appending them. Three ways
of handling text, each timed in its own rounds, interleaved:

  text      the default: text made (no stop strings: decoded in one call when the row ends)
  no_text   detokenize=False (bench/throughput.py's setting for both engines)
  stop      a stop string (never found): tokens decoded and searched one by one

Prints and writes one row per mode to --out/host_step-<date>.json: ``host_ms_per_step``
(``median``: the median decode step, the best round; ``mean``: wall time over steps, the
ends of rows included), and, as host-only bounds, ``output_tok_s`` = rows * 1000 / mean
(``total_tok_s`` the same; no prompt is processed by a model).

    python bench/host_step.py [--rows 256] [--max-tokens 128] [--rounds 4] [--model DIR]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import append_rows  # noqa: E402  (bench/results_file.py)

MODES = {"text": {}, "no_text": {"detokenize": False}, "stop": {"stop": ["\x00 never \x00"]}}
PROMPT_LEN = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint dir (default: a tiny random llama)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per mode")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--label", default="", help="a note for the result rows")
    args = parser.parse_args()

    import torch

    from hpcinfer import LLMEngine, SamplingParams
    torch.set_num_threads(1)
    model = args.model
    if model is None:
        from hpcinfer.testing.tiny import tiny_checkpoint
        model = str(tiny_checkpoint("llama"))
    engine = LLMEngine.from_kwargs(model, device="cpu", dtype="float32",
                                   max_num_seqs=args.rows, async_scheduling=True,
                                   max_model_len=PROMPT_LEN + args.max_tokens + 16)
    vocab = engine.spec.vocab_size
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(args.rows, vocab, generator=generator) for _ in range(7)]
    calls = [0]

    def constant_logits(batch):
        calls[0] += 1
        rows = len(batch.sample_seqs) or 1
        return logits[calls[0] % len(logits)][:rows]

    engine.runner.run = constant_logits
    # Text prompts (as a job's): their last token ends a character, as a chat template's
    # does. Random ids would often end inside one, and such rows decode token by token.
    prompts = [engine.tokenizer(f"Row {i}: tell me about the weather in city number {i}. " * 8,
                                add_special_tokens=False).input_ids[:PROMPT_LEN]
               for i in range(args.rows)]

    def one_round(tag: str, **extra) -> tuple[float, float]:
        params = SamplingParams(**{"temperature": 0, "max_tokens": args.max_tokens,
                                   "ignore_eos": True, **extra})
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", prompt, params)
        steps, start = [], time.perf_counter()
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step(final_only=True)
            steps.append(time.perf_counter() - t0)
        mean = (time.perf_counter() - start) / len(steps)
        return 1e3 * statistics.median(steps[2:-2]), 1e3 * mean

    one_round("warmup", max_tokens=8)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode, extra in MODES.items():
            times[mode].append(one_round(f"{mode}{r}", **extra))
    date = time.strftime("%Y-%m-%d")
    rows = []
    for mode, runs in times.items():
        median, mean = min(m for m, _ in runs), min(w for _, w in runs)
        tok_s = round(args.rows * 1e3 / mean, 1)
        rows.append({
            "engine": "hpcinfer", "workload": f"host-step-{mode}", "tp": 1,
            "output_tok_s": tok_s, "total_tok_s": tok_s,
            "host_ms_per_step": {"median": round(median, 3), "mean": round(mean, 3)},
            "device": f"cpu ({len(os.sched_getaffinity(0))} cores, {socket.gethostname()})",
            "date": date, "rows": args.rows, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "model": args.model or "tiny-llama",
            "load_avg_1min": round(os.getloadavg()[0], 2), "label": args.label})
        print(f"{mode:8s} host ms/step: median {median:.3f}, mean {mean:.3f} (ends of rows "
              f"included) -> at most {tok_s:,.0f} output tok/s", flush=True)
    print("wrote", append_rows(args.out / f"host_step-{date}.json", rows, indent=1))


if __name__ == "__main__":
    main()
