"""vLLM's async_llm_streaming.py flow: AsyncEngineArgs -> AsyncLLM.from_engine_args, DELTA
outputs streamed per prompt, shutdown() at the end. Also checks the deltas add up to the
same tokens as a CUMULATIVE run of the same seeded request."""
import asyncio

from hpcinfer.engine.arg_utils import AsyncEngineArgs
from hpcinfer.sampling_params import RequestOutputKind, SamplingParams
from hpcinfer.v1.engine.async_llm import AsyncLLM


def params(kind: RequestOutputKind) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=42, output_kind=kind)


async def stream(engine: AsyncLLM, prompt: str, request_id: str, kind) -> list:
    pieces = []
    async for output in engine.generate(request_id=request_id, prompt=prompt,
                                        sampling_params=params(kind)):
        pieces.append(output.outputs[0].token_ids)
        if output.finished:
            break
    return pieces


async def main() -> None:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model="tiny-llama", enforce_eager=True))
    try:
        for i, prompt in enumerate(["The future of AI is", "In a galaxy far away"]):
            deltas = await stream(engine, prompt, f"delta-{i}", RequestOutputKind.DELTA)
            cumulative = await stream(engine, prompt, f"cum-{i}", RequestOutputKind.CUMULATIVE)
            joined = [t for piece in deltas for t in piece]
            print(f"prompt {i}: {len(deltas)} deltas, same tokens: {joined == cumulative[-1]}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
