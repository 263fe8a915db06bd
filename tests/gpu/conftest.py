"""GPU tests run the Triton kernels compiled. Started by hand (``pytest tests/gpu/...``)
without HPCINFER_GPU_TESTS=1, the root conftest would put them in the CPU interpreter: on a
GPU that is a few hundred times slower and fails the kernel tests on interpreter limits (an
H200 session lost a 10-minute call to it, 2026-12-04). Stop at once instead."""
from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
    pytest.exit("tests/gpu would run the Triton kernels in the CPU interpreter "
                "(TRITON_INTERPRET=1): run them with HPCINFER_GPU_TESTS=1 (or "
                "TRITON_INTERPRET=0), as tests/gpu/run_gpu_checks.sh does", returncode=4)
