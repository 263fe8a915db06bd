"""Golden files for rendered text: compare, print a diff on mismatch, and say how to accept.

`UPDATE_GOLDEN=1 pytest tests/login -k golden` rewrites the golden files instead of comparing.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "login" / "golden"


def check_golden(name: str, text: str, golden_dir: Path = GOLDEN_DIR) -> None:
    path = golden_dir / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"no golden file {path}: run UPDATE_GOLDEN=1 pytest tests/login -k golden"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "rendered"))
        pytest.fail(f"rendered {name} differs from the golden file:\n{diff}\n"
                    "If the change is intended: UPDATE_GOLDEN=1 pytest tests/login -k golden",
                    pytrace=False)
