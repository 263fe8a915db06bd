"""``vllm.sampling_params`` at hpcinfer's path: SamplingParams, RequestOutputKind and the
structured-outputs constraint (StructuredOutputsParams, its older name GuidedDecodingParams)."""
from hpcinfer.engine.params import SAMPLING_EPS, RequestOutputKind, SamplingParams
from hpcinfer.engine.structured_params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["SAMPLING_EPS", "GuidedDecodingParams", "RequestOutputKind", "SamplingParams",
           "StructuredOutputsParams"]
