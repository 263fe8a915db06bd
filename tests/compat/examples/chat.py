"""vLLM's basic/chat.py flow: EngineArgs.add_cli_args returns the parser, sampling flags with
SamplingParams' defaults, the sampling attributes deleted from the namespace before
LLM(**vars(args)), one conversation, a batch of them, and a tool list for the template."""
from hpcinfer import LLM, EngineArgs, SamplingParams
from hpcinfer.utils import FlexibleArgumentParser

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def main(args) -> None:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
    for name in ("max_tokens", "temperature", "top_p", "top_k"):
        delattr(args, name)
    llm = LLM(**vars(args))
    conversation = [{"role": "system", "content": "You are a helpful assistant"},
                    {"role": "user", "content": "Hello"}]
    for out in llm.chat(conversation, params, use_tqdm=False):
        print(f"single: {len(out.outputs[0].token_ids)} tokens")
    outs = llm.chat([conversation] * 4, params, use_tqdm=True)
    print(f"batch: {len(outs)} outputs")
    with_tools = llm.chat(conversation, params, use_tqdm=False, tools=TOOLS)
    print(f"tools: {len(with_tools[0].outputs[0].token_ids)} tokens")


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    defaults = SamplingParams()
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.set_defaults(model="tiny-llama")
    main(parser.parse_args())
