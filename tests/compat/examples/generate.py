"""vLLM's examples/offline_inference/basic/generate.py flow, in our words: engine flags in an
argument group with a default model, sampling flags beside them, LLM(**vars(args)), and the
default SamplingParams changed field by field."""
from hpcinfer import LLM, EngineArgs
from hpcinfer.utils import FlexibleArgumentParser


def main(args: dict) -> None:
    sampling = {name: args.pop(name) for name in ("max_tokens", "temperature", "top_p", "top_k")}
    llm = LLM(**args)
    params = llm.get_default_sampling_params()
    for name, value in sampling.items():
        if value is not None:
            setattr(params, name, value)
    prompts = ["Hello, my name is", "The capital of France is"]
    for out in llm.generate(prompts, params):
        print(f"Prompt: {out.prompt!r}, tokens: {len(out.outputs[0].token_ids)}, "
              f"text: {out.outputs[0].text!r}")


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    engine_group.set_defaults(model="tiny-llama")
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    sampling_group.add_argument("--temperature", type=float)
    sampling_group.add_argument("--top-p", type=float)
    sampling_group.add_argument("--top-k", type=int)
    main(vars(parser.parse_args()))
