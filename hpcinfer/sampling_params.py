"""``vllm.sampling_params`` at hpcinfer's path: SamplingParams and RequestOutputKind."""
from hpcinfer.engine.params import SAMPLING_EPS, RequestOutputKind, SamplingParams

__all__ = ["SAMPLING_EPS", "RequestOutputKind", "SamplingParams"]
