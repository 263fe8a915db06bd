"""pyproject.toml lists packages by hand (flat, with kernels/ mapped to hpcinfer.kernels): a
subpackage missing there is missing from the wheel, which only test_wheel.py (slow) would
notice. This checks the list against the source tree in milliseconds."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_in_the_wheel_list():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts)
               for init in (REPO / "hpcinfer").rglob("__init__.py")}
    on_disk |= {"hpcinfer.kernels"} if (REPO / "kernels" / "__init__.py").is_file() else set()
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
