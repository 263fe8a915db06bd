"""Skip locally, fail in CI: how tests treat a real part (Slurm, MPI, a package) that is missing.

With CI=true a test that needs a real part must run; a missing part fails it loudly instead of
skipping, so CI can never pass by skipping.
"""
from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip (locally) or fail (CI) when a real part the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {why}: this test must run in CI, never skip", pytrace=False)
    pytest.skip(why)
