# The Alliance Canada vLLM guide's single-node example (one process, tensor_parallel_size=2),
# with only the import swapped from vllm to hpcinfer. The guide points `model` at a model
# downloaded under $SCRATCH; here the test passes a tiny checkpoint in MODEL_PATH and forces
# the CPU (the guide's job has 2 GPUs).
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

llm = LLM(model=model_path, tensor_parallel_size=2, device=os.environ.get("DEVICE", "auto"))

outputs = llm.generate(prompts, sampling_params)

for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
