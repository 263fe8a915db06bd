"""kernels/ installs as hpcinfer.kernels; run from a checkout (repository root on sys.path) it
must not shadow Hugging Face's top-level ``kernels`` package, which transformers >= 5.25
imports (a shadowed import failed every model test with ImportError: CUDAProperties)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHOW = "import kernels; print(kernels.__file__)"


def _run(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    # python -c from the repository root puts the root first on sys.path, as `python -m
    # pytest` and the quickstart do
    env = {"PATH": "/usr/bin:/bin"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_import_kernels_from_the_checkout_gets_the_other_package(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("CUDAProperties = 'hf'\n")
    done = _run(SHOW + "; from kernels import CUDAProperties; print(CUDAProperties)", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(fake / "__init__.py"), "hf"]


def test_import_kernels_without_another_package_still_imports():
    """transformers < 5.25 import whatever ``kernels`` they find to read its version."""
    done = _run(SHOW)
    assert done.returncode == 0, done.stderr


def test_hpcinfer_kernels_still_imports_from_the_checkout():
    done = _run("import hpcinfer.kernels.reference as r, sys; print(r.__name__); "
                "print('kernels' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hpcinfer.kernels.reference", "False"]
