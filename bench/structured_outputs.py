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
never allowed). Prints one JSON line and writes it to --out.

    python bench/structured_outputs.py --tokenizer DIR [--out DIR]
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


def build_model(root: Path, tokenizer_dir: Path) -> Path:
    ckpt = write_checkpoint(root / "ckpt", SHAPES[WORKLOADS["A"]["shape"]])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, ckpt / name)
    return ckpt


def timed(llm, prompts, params) -> tuple[list, float]:
    import torch
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return outs, time.perf_counter() - start


def run(ckpt: Path, num_prompts: int, max_tokens: int) -> dict:
    import numpy as np
    import torch
    from hpcinfer import LLM
    from hpcinfer.sampling_params import SamplingParams, StructuredOutputsParams
    llm = LLM(str(ckpt), dtype="bfloat16", max_model_len=1024, max_num_seqs=256,
              max_num_batched_tokens=8192, gpu_memory_utilization=0.9,
              enable_prefix_caching=False)
    vocab = len(llm.get_tokenizer())
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(10, vocab, 256).tolist()}
               for _ in range(num_prompts)]
    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
                 * num_prompts, use_tqdm=False)   # warm-up: Triton compiles
    engine = llm.llm_engine
    result = {"device": torch.cuda.get_device_name(0), "num_prompts": num_prompts,
              "max_tokens": max_tokens, "logits_vocab": engine.spec.vocab_size,
              "tokenizer_vocab": vocab, "async_scheduling": engine.config.async_scheduling}
    for name, so in (("free", None),
                     ("json_long", StructuredOutputsParams(json=LONG_SCHEMA)),
                     ("json_extraction", StructuredOutputsParams(json=EXTRACTION_SCHEMA))):
        params = free if so is None else SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=so)
        masks_before, mask_s_before = engine.stats.num_grammar_masks, engine.stats.grammar_mask_s
        steps_before = engine.stats.num_steps
        outs, wall = timed(llm, prompts, [params] * num_prompts)
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        num_masks = engine.stats.num_grammar_masks - masks_before
        row = {"wall_s": round(wall, 3), "output_tokens": num_out,
               "output_tok_s": round(num_out / wall, 1),
               "steps": engine.stats.num_steps - steps_before, "mask_steps": num_masks,
               "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs})}
        if num_masks:
            row["mask_ms_per_step"] = round(
                1e3 * (engine.stats.grammar_mask_s - mask_s_before) / num_masks, 3)
        if name == "json_extraction":
            row["valid"] = sum(_parses(o.outputs[0].text) for o in outs)
        result[name] = row
        print(name, json.dumps(row), flush=True)
    result["json_long_vs_free"] = round(result["json_long"]["output_tok_s"]
                                        / result["free"]["output_tok_s"], 3)
    return result


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_model(Path(tmp), args.tokenizer)
        result = run(ckpt, args.num_prompts, args.max_tokens)
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    name = result["device"].lower().replace(" ", "-")
    (args.out / f"structured-outputs-{name}-{time.strftime('%Y-%m-%d')}.json").write_text(
        json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
