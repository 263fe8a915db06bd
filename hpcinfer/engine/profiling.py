"""``LLM.start_profile()`` / ``stop_profile()`` (vLLM's names): a torch profiler trace of what
the engine runs between the two calls, written where ``VLLM_TORCH_PROFILER_DIR`` (or
``HPCINFER_TORCH_PROFILER_DIR``) points, as vLLM does, so a script that profiles with vLLM
profiles the same way here. The trace is Chrome-trace JSON (``*.pt.trace.json``: open it in
Perfetto or chrome://tracing); on a GPU it has the kernels too. Only this process is traced:
with tensor or pipeline parallelism over several processes, the driver's rank.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch

DIR_ENVS = ("HPCINFER_TORCH_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")


def trace_dir() -> Path:
    """Where traces go: the first of DIR_ENVS that is set, else an error that says so."""
    for name in DIR_ENVS:
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser().resolve()
    raise RuntimeError("start_profile() needs a directory for the trace: set "
                       f"{' or '.join(DIR_ENVS)} (e.g. VLLM_TORCH_PROFILER_DIR=./profile) "
                       "before calling it")


class TraceProfiler:
    """One torch profiler at a time, started and stopped by the LLM's calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self._profiler = None
        self.last_trace: Path | None = None   # the file the last stop() wrote

    def start(self) -> None:
        if self._profiler is not None:
            raise RuntimeError("start_profile() was called again before stop_profile()")
        directory = trace_dir()
        directory.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def on_ready(prof) -> None:   # named as torch's tensorboard handler names its files
            name = f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json"
            path = directory / name
            prof.export_chrome_trace(str(path))
            self.last_trace = path
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                                on_trace_ready=on_ready)
        self._profiler.start()

    def stop(self) -> Path | None:
        """Stop and write the trace; returns its path."""
        if self._profiler is None:
            raise RuntimeError("stop_profile() without a start_profile() before it")
        profiler, self._profiler = self._profiler, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # the kernels queued so far are in the trace
        profiler.stop()
        return self.last_trace
