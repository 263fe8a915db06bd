# The Alliance Canada vLLM guide's multi-node example (tensor_parallel_size=4 across the job's
# GPUs), with only the import swapped from vllm to hpcinfer. The guide starts a Ray cluster
# first; hpcinfer needs none: launch this file with `srun` / `mpirun -n 4` and every rank runs
# it (SPMD) and gets the same outputs. MODEL_PATH and DEVICE as in alliance_single_node.py.
import os

from hpcinfer import LLM, SamplingParams

model_path = os.environ["MODEL_PATH"]

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

llm = LLM(model=model_path, tensor_parallel_size=4, device=os.environ.get("DEVICE", "auto"))

outputs = llm.generate(prompts, sampling_params)

for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
