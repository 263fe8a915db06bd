# vLLM's examples/offline_inference/basic/reward.py (before EngineArgs.add_cli_args) with
# `from vllm import LLM` swapped for `from hpcinfer import LLM`. The model is a local
# checkpoint directory, taken from EXAMPLE_MODEL.
import os

from hpcinfer import LLM

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]

# Create an LLM.
# You should pass task="reward" for reward models
model = LLM(
    model=os.environ.get("EXAMPLE_MODEL", "internlm/internlm2-1_8b-reward"),
    task="reward",
    enforce_eager=True,
    trust_remote_code=True,
)

# Generate rewards. The output is a list of PoolingRequestOutput.
outputs = model.reward(prompts)

# Print the outputs.
for prompt, output in zip(prompts, outputs):
    rewards = output.outputs.data
    rewards_trimmed = ((str(rewards[:16])[:-1] +
                        ", ...]") if len(rewards) > 16 else rewards)
    print(f"Prompt: {prompt!r} | "
          f"Reward: {rewards_trimmed} (size={len(rewards)})")
