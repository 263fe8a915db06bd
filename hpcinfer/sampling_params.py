"""``vllm.sampling_params`` at hpcinfer's path: SamplingParams, RequestOutputKind, the
structured-outputs constraint (StructuredOutputsParams, its older name GuidedDecodingParams)
and BeamSearchParams (LLM.beam_search)."""
from hpcinfer.engine.beam_search import BeamSearchParams
from hpcinfer.engine.params import SAMPLING_EPS, RequestOutputKind, SamplingParams
from hpcinfer.engine.structured_params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["SAMPLING_EPS", "BeamSearchParams", "GuidedDecodingParams", "RequestOutputKind",
           "SamplingParams", "StructuredOutputsParams"]
