"""vLLM's basic_with_model_default_sampling.py flow: generation_config="auto" takes the
defaults from the model's generation_config.json; the returned params are changed in place."""
from hpcinfer import LLM

llm = LLM(model="tiny-llama", generation_config="auto")
params = llm.get_default_sampling_params()
print(f"defaults: top_k={params.top_k} top_p={params.top_p} max_tokens={params.max_tokens}")
params.temperature = 0.5
for out in llm.generate(["Hello, my name is"], params):
    print(f"tokens: {len(out.outputs[0].token_ids)}")
