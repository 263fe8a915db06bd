"""Greedy tokens of each quantized checkpoint at tensor_parallel_size=2, spawned from this one
process on CPU (gloo), printed as one JSON line: {path: tokens}. Run by test_tensor_parallel."""
import json
import sys

import torch

from hpcinfer import LLM, SamplingParams

prompts, max_new = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
results = {}
for arg in sys.argv[3:]:
    path, _, quantization = arg.partition("@")
    llm = LLM(path, tensor_parallel_size=2, device="cpu", max_model_len=128,
              quantization=quantization or None)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new,
                                                ignore_eos=True), use_tqdm=False)
    results[arg] = [o.outputs[0].token_ids for o in outs]
    del llm
print("TOKENS " + json.dumps(results))
