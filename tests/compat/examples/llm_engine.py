"""vLLM's llm_engine_example.py and llm_engine_reset_kv.py flow: EngineArgs.from_cli_args ->
LLMEngine.from_engine_args, then add_request / step until done, with logprobs, penalties,
n + best_of, prompt_logprobs, and reset_prefix_cache(reset_running_requests=True) mid-run."""
import argparse

from hpcinfer import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from hpcinfer.utils import FlexibleArgumentParser


def test_prompts() -> list[tuple[str, SamplingParams]]:
    return [
        ("A robot may not injure a human being",
         SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1)),
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2)),
        ("What is the meaning of life?",
         SamplingParams(n=2, best_of=5, temperature=0.8, top_p=0.95, frequency_penalty=0.1)),
    ]


def process(engine: LLMEngine, prompts: list[tuple[str, SamplingParams]]) -> None:
    request_id, step = 0, 0
    while prompts or engine.has_unfinished_requests():
        if prompts:
            prompt, params = prompts.pop(0)
            engine.add_request(str(request_id), prompt, params)
            request_id += 1
        if step == 3:
            print("reset prefix cache:", engine.reset_prefix_cache(reset_running_requests=True))
        outputs: list[RequestOutput] = engine.step()
        for out in outputs:
            if out.finished:
                print(f"request {out.request_id}: {len(out.outputs)} outputs, "
                      f"{[len(c.token_ids) for c in out.outputs]} tokens")
                if out.prompt_logprobs is not None:
                    print(f"request {out.request_id}: prompt logprobs for "
                          f"{len(out.prompt_logprobs)} of {len(out.prompt_token_ids)} prompt "
                          f"tokens, first {out.prompt_logprobs[0]}")
        step += 1


def main(args: argparse.Namespace) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    process(engine, test_prompts())


if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="LLMEngine directly")
    parser = EngineArgs.add_cli_args(parser)
    main(parser.parse_args())
