"""vLLM's basic/classify.py, embed.py, score.py and reward.py flow: parser defaults name the
model and the task (``task=`` in older scripts, ``runner="pooling"`` in newer ones), then
LLM(**vars(args)) and the task's method. argv[1] picks which (this file stands for the four)."""
import sys

from hpcinfer import LLM, EngineArgs
from hpcinfer.utils.argparse_utils import FlexibleArgumentParser

DEFAULTS = {
    "classify": dict(model="tiny-llama-cls", task="classify", enforce_eager=True),
    "embed": dict(model="tiny-llama-embed", task="embed", enforce_eager=True),
    "score": dict(model="tiny-reranker", runner="pooling", enforce_eager=True),
    "reward": dict(model="tiny-llama-cls", runner="pooling", convert="reward",
                   enforce_eager=True, max_model_len=256, trust_remote_code=True),
}
PROMPTS = ["Hello, my name is", "The capital of France is"]


def main(which: str, args) -> None:
    llm = LLM(**vars(args))
    if which == "classify":
        for out in llm.classify(PROMPTS):
            print(f"classify: {len(out.outputs.probs)} probs, sum {sum(out.outputs.probs):.4f}")
    elif which == "embed":
        for out in llm.embed(PROMPTS):
            print(f"embed: size {len(out.outputs.embedding)}")
    elif which == "score":
        for out in llm.score("What is the capital of France?", PROMPTS):
            print(f"score: {out.outputs.score:.4f}")
    else:
        for out in llm.reward(PROMPTS):
            print(f"reward: shape {tuple(out.outputs.data.shape)}")


if __name__ == "__main__":
    which = sys.argv.pop(1)
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(**DEFAULTS[which])
    main(which, parser.parse_args())
