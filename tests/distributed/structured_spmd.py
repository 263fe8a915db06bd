"""Structured outputs with the driver-side mask: ``python structured_spmd.py CHECKPOINT TP PP``
runs tiny constrained and free requests with tensor_parallel_size=TP and
pipeline_parallel_size=PP in one process (it spawns its other ranks) and prints one JSON
line per request: its token ids and finish reason."""
import json
import sys

from hpcinfer import LLM
from hpcinfer.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 20},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["kind", "age", "tags"], "additionalProperties": False}


def requests():
    json_so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    return (["Hello", "A cluster schedules jobs", "def main():", "Numbers like 12345"], [
        SamplingParams(temperature=0, max_tokens=120, structured_outputs=json_so),
        SamplingParams(temperature=1.0, seed=3, max_tokens=120, structured_outputs=json_so),
        SamplingParams(temperature=0.8, seed=5, max_tokens=40, structured_outputs=(
            StructuredOutputsParams(regex=r"[a-z]{2,5}-[0-9]{2}"))),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])


def main() -> None:
    model, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model, device="cpu", dtype="float32", tensor_parallel_size=tp,
              pipeline_parallel_size=pp)
    prompts, params = requests()
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        print(json.dumps({"token_ids": completion.token_ids, "text": completion.text,
                          "finish_reason": completion.finish_reason}), flush=True)


if __name__ == "__main__":
    main()
