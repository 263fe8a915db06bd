"""vLLM's metrics.py flow: LLM(disable_log_stats=False), generate, then every metric of
get_metrics() printed by its reader type."""
from hpcinfer import LLM, SamplingParams
from hpcinfer.v1.metrics.reader import Counter, Gauge, Histogram, Vector


def main() -> None:
    llm = LLM(model="tiny-llama", disable_log_stats=False)
    llm.generate(["Hello, my name is", "The future of AI is"],
                 SamplingParams(temperature=0.8, top_p=0.95))
    for metric in llm.get_metrics():
        if isinstance(metric, Gauge):
            print(f"{metric.name} (gauge) = {metric.value}")
        elif isinstance(metric, Counter):
            print(f"{metric.name} (counter) = {metric.value}")
        elif isinstance(metric, Vector):
            print(f"{metric.name} (vector) = {metric.values}")
        elif isinstance(metric, Histogram):
            print(f"{metric.name} (histogram) count = {metric.count} "
                  f"+Inf = {metric.buckets['+Inf']}")


if __name__ == "__main__":
    main()
