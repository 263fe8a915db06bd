"""Which BLAS library torch's GEMMs use on a GPU: ``HPCINFER_BLAS_LIBRARY=cublas|cublaslt``
(unset: torch's choice). An environment variable so spawned tensor-parallel ranks agree.

Why a switch: workload A's small-N projections (M = 256 rows, K = 2048, N = 2048-3072) ran
at ~20% of the H200's bf16 peak with the tiles cuBLAS picks (docs/performance.md, the
2026-12-04 profile); cuBLASLt chooses its kernels with another heuristic.
``bench/kernel_bench.py --only blas`` times both on the projections of the bench models."""
from __future__ import annotations

import os

import torch

BLAS_LIBRARIES = ("cublas", "cublaslt")


def choose_blas(device: torch.device) -> str | None:
    """Apply HPCINFER_BLAS_LIBRARY for this process (on CUDA); the library chosen, or None."""
    name = os.environ.get("HPCINFER_BLAS_LIBRARY", "")
    if not name:
        return None
    if name not in BLAS_LIBRARIES:
        raise ValueError(f"HPCINFER_BLAS_LIBRARY={name!r}: use one of "
                         f"{', '.join(BLAS_LIBRARIES)} (or leave it unset for torch's choice)")
    if device.type != "cuda":
        return None
    torch.backends.cuda.preferred_blas_library(name)
    return name
