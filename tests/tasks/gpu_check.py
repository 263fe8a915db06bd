"""Pooling tasks on a CUDA GPU (not part of CI): the Triton backend's no-cache path
(bidirectional for encoders, causal for decoders) against transformers on the same GPU.

    python tests/tasks/gpu_check.py          # with hpcinfer importable (see
                                             # tests/gpu/run_gpu_checks.sh for a shim)
Prints one line per check and exits 1 if any is off.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from hpcinfer import LLM
from hpcinfer.testing.tiny_pooling import (TEXTS, build_tiny_pooling_checkpoint, hf_embeddings,
                                           hf_logits, hf_token_scores)


def _max_diff(ours, theirs) -> float:
    return max(float((torch.as_tensor(a).float().cpu() - b.float().cpu()).abs().max())
               for a, b in zip(ours, theirs))


def main() -> int:
    root = Path(tempfile.mkdtemp())
    texts = TEXTS * 11   # 66 inputs, several steps with a small budget
    failures = 0

    def check(name: str, diff: float, tol: float) -> None:
        nonlocal failures
        ok = diff <= tol
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: max |diff| {diff:.2e} (tol {tol:.0e})")

    kw = dict(device="cuda", dtype="float32", attention_backend="triton",
              max_num_batched_tokens=256)
    for kind, mode, pooling in [("bert", "mean", "MEAN"), ("xlm-roberta", "cls", "CLS"),
                                ("qwen3-embed", "lasttoken", "LAST")]:
        path = build_tiny_pooling_checkpoint(kind, root / kind, sentence_transformers=True,
                                             pooling_mode=mode)
        ours = [o.outputs.embedding for o in LLM(str(path), **kw).embed(texts)]
        check(f"embed {kind} fp32 triton", _max_diff(ours, hf_embeddings(path, texts, pooling)),
              1e-4)
        bf16 = [o.outputs.embedding for o in LLM(str(path), device="cuda").embed(texts)]
        cos = min(float(torch.nn.functional.cosine_similarity(torch.tensor(a), b, dim=0))
                  for a, b in zip(bf16, hf_embeddings(path, texts, pooling)))
        check(f"embed {kind} auto dtype (bf16) 1 - min cosine", 1 - cos, 1e-2)
    for kind in ("bert-cls", "xlm-roberta-cls", "llama-cls", "qwen2-cls"):
        path = build_tiny_pooling_checkpoint(kind, root / kind)
        ours = [o.outputs.probs for o in LLM(str(path), **kw).classify(texts)]
        want = [torch.softmax(x, -1) for x in hf_logits(path, texts)]
        check(f"classify {kind} fp32 triton", _max_diff(ours, want), 1e-4)
    path = build_tiny_pooling_checkpoint("qwen2-cls", root / "reward")
    ours = [o.outputs.data for o in LLM(str(path), task="reward", **kw).reward(texts)]
    check("reward qwen2-cls fp32 triton", _max_diff(ours, hf_token_scores(path, texts)), 1e-4)

    # throughput of the tiny BERT (ST files, mean pooling) on the GPU, for the record
    import random
    rng = random.Random(0)
    words = " ".join(TEXTS).split()
    many = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))) for _ in range(8192)]
    path = root / "bert"

    def rate(fn) -> float:
        fn(many[:512])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(many)
        torch.cuda.synchronize()
        return len(many) / (time.perf_counter() - t0)

    name = torch.cuda.get_device_name(0)
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(path), device="cuda", dtype=dtype)
        print(f"hpcinfer tiny bert {dtype} on {name}: {rate(llm.embed):.0f} embeddings/s")
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(path), device="cuda")
        print(f"sentence-transformers tiny bert float32 on {name}: "
              f"{rate(lambda t: st.encode(t, batch_size=256)):.0f} embeddings/s")
    except ImportError:
        print("sentence-transformers not installed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
