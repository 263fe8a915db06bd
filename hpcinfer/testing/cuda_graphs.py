"""One function for the GPU tests and kernel benchmarks that check a launcher inside a CUDA
graph (as decode runs it): warm up on a side stream (Triton compiles there, outside the
capture), then capture."""
from __future__ import annotations


def capture(fn):
    """``fn()`` captured in a CUDA graph after one warm-up run; returns (graph, the output of
    the captured call, whose storage each ``graph.replay()`` rewrites)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
