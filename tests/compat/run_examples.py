"""Run several example scripts in one Python process, each as ``__main__`` with its own argv
(importing torch and transformers once instead of once per script).

    python run_examples.py '[["examples/generate.py", "--max-tokens", "8"], ...]'

Each script's output is framed by ``=== BEGIN <n>`` and ``=== END <n> rc=<code>`` lines; an
exception is printed and gives rc=1, and the next script still runs.
"""
from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import traceback


def run_one(path: str, argv: list[str]) -> int:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python path` does
    try:
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and go on with the next script
        traceback.print_exc(file=sys.stdout)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        gc.collect()


def main() -> int:
    runs = json.loads(sys.argv[1])
    worst = 0
    for i, (path, *argv) in enumerate(runs):
        print(f"=== BEGIN {i}", flush=True)
        rc = run_one(path, argv)
        print(f"=== END {i} rc={rc}", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main())
