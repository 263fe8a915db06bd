"""``vllm.beam_search`` at hpcinfer's path: the result types of ``LLM.beam_search``."""
from hpcinfer.engine.beam_search import BeamSearchOutput, BeamSearchSequence

__all__ = ["BeamSearchOutput", "BeamSearchSequence"]
