#!/usr/bin/env bash
# Prepares .whl/ (git-excluded) for the GPU machine, which has torch, triton and
# transformers but reaches no network: the wheels of the other packages the GPU scripts need
# (xgrammar for structured outputs, pydantic for job configs, peft for the LoRA oracle, gguf
# for the trained test models), for its Python 3.12 on x86_64, and SmolLM2's tokenizer
# (.whl/tok: bench/structured_outputs.py --tokenizer). ~9 MB: name ".whl" in the device
# call's carry; tests/gpu/shim.sh, which every GPU script sources, installs them there.
#
#   bash dev/device-wheels.sh          # run here (login side / dev machine), once a session
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
OUT=$REPO/.whl
grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$REPO/.git/info/exclude"
mkdir -p "$OUT"
# The versions this checkout is tested with on the CPU (pyproject extras / dev/setup.sh).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$OUT" \
  "xgrammar==$("$PY" -c 'import importlib.metadata as m; print(m.version("xgrammar"))')" \
  "apache-tvm-ffi==$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')" \
  "pydantic==$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic"))')" \
  "pydantic_core==$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic_core"))')" \
  annotated-types typing-inspection \
  "peft==$("$PY" -c 'import importlib.metadata as m; print(m.version("peft"))')" \
  accelerate psutil \
  "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
if [[ ! -f $OUT/tok/tokenizer.json ]]; then
  "$PY" - "$OUT/tok" <<'PY'
import shutil, sys
from pathlib import Path
from hpcinfer.testing.real_models import SMOLLM2, real_model_dir
src, dst = real_model_dir(SMOLLM2.name), Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, dst / name)
PY
fi
du -sh "$OUT"
ls "$OUT"
