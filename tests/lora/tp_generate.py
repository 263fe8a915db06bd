"""Greedy tokens of a mixed LoRA batch at tensor_parallel_size=2, spawned from this one
process on CPU (gloo), printed as one JSON line. Run by test_lora_tensor_parallel.py.
argv[1]: {"base": path, "adapters": [[name, id, path], ...], "rows": [[prompt, adapter
index or null], ...], "max_new": n, "max_loras": k}"""
import json
import sys

import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.request import LoRARequest

spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
loras = [LoRARequest(name, lora_id, path) for name, lora_id, path in spec["adapters"]]
llm = LLM(spec["base"], tensor_parallel_size=2, device="cpu", max_model_len=128,
          enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=16)
outs = llm.generate([{"prompt_token_ids": p} for p, _ in spec["rows"]],
                    SamplingParams(temperature=0, max_tokens=spec["max_new"], ignore_eos=True),
                    use_tqdm=False,
                    lora_request=[None if i is None else loras[i] for _, i in spec["rows"]])
print("STACKED " + json.dumps(sorted({layer.stacked for layer in llm.llm_engine.lora.layers})))
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]))
