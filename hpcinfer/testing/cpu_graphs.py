"""Decode "CUDA graphs" on the CPU, for tests of everything around the capture.

A captured graph reads fixed addresses: the static input buffers (and LoRA's slot weights
and per-row slot indices), never the step's own tensors. ``ReplayOnCpu`` is DecodeGraphs
with the one CUDA-only piece (capture) replaced by re-running the forward (and the LM head,
when the graphs capture it) over the static buffers, with LoRA's hooks forced on as at
capture, which is what a replay does. The real graphs run in tests/gpu/.
"""
from __future__ import annotations

from hpcinfer.engine.cuda_graphs import DecodeGraphs


class ReplayOnCpu(DecodeGraphs):
    """A graph whose replay runs the captured forward again, reading only the static
    buffers; the padded rows' outputs are NaN, so a step that reads them fails its test."""

    _live = 0   # rows of the batch being replayed (the rest are padding)

    def _capture_one(self, bs, pool):
        graphs = self
        hidden, logits = self._graph_body(bs)

        class Replay:
            def replay(self):
                with graphs._lora_applied(0):
                    new_hidden, new_logits = graphs._graph_body(bs)
                for out, new in ((hidden, new_hidden), (logits, new_logits)):
                    if out is not None:
                        out.copy_(new)
                        out[graphs._live:] = float("nan")
        return Replay(), (hidden, logits), pool

    def _replay(self, input_ids, *args):
        self._live = input_ids.shape[0]
        return super()._replay(input_ids, *args)

    def _synchronize(self):
        pass


def install_graphs(llm) -> ReplayOnCpu:
    """Give ``llm``'s runner CPU replay graphs over its model and KV cache; return them."""
    runner = llm.llm_engine.runner
    spec = runner.spec
    runner.graphs = ReplayOnCpu(runner.model, runner.kv_caches, llm.llm_engine.config.max_num_seqs,
                                runner.max_blocks_per_seq, spec.hidden_size, spec.dtype,
                                runner.device, lora=runner.lora,
                                logits_fn=runner.graph_logits_fn())
    runner.graphs.capture()
    return runner.graphs
