"""vLLM's prefix_caching.py flow: one LLM without, one with prefix caching (the first deleted
and cleaned up with cleanup_dist_env_and_memory), greedy answers compared."""
from hpcinfer import LLM, SamplingParams
from hpcinfer.distributed import cleanup_dist_env_and_memory

PREFIX = ("You are an expert school principal. Draft questions for a potential first grade "
          "Head Teacher for an independent school. Based on this, fulfill the paragraph: ")
PROMPTS = [PREFIX + p for p in ("Hello, my name is", "The capital of France is")]
PARAMS = SamplingParams(temperature=0.0)


def texts(llm: LLM) -> list[str]:
    return [out.outputs[0].text for out in llm.generate(PROMPTS, PARAMS)]


def main() -> None:
    regular = LLM(model="tiny-llama", enable_prefix_caching=False, gpu_memory_utilization=0.4)
    baseline = texts(regular)
    del regular
    cleanup_dist_env_and_memory()
    cached = LLM(model="tiny-llama", enable_prefix_caching=True, gpu_memory_utilization=0.4)
    cached.generate(PROMPTS[0], PARAMS)  # warm the shared prefix
    print(f"Generated answers are the same: {texts(cached) == baseline}")
    hits = {m.name: m.value for m in cached.get_metrics() if m.name == "vllm:prefix_cache_hits"}
    print(f"prefix cache hits: {hits['vllm:prefix_cache_hits']}")


if __name__ == "__main__":
    main()
