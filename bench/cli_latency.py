"""Cold-start latency of the login-side CLI: `hpcinfer --help`, `validate` and `render`.

Each run is a fresh interpreter (what a user on a login node pays), with bytecode caches warm
(as after pip install). Prints the median of N runs per command and writes
bench/results/cli_latency-<date>.json. Target: render well under 0.3 s.

    .venv/bin/python bench/cli_latency.py [--repeats 7] [--job configs/examples/quickstart.yaml]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cold_seconds(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--job", default=str(REPO / "configs" / "examples" / "quickstart.yaml"))
    args = parser.parse_args()
    exe = [sys.executable, "-m", "hpcinfer.cli"]
    out_dir = tempfile.mkdtemp(prefix="cli-latency-")
    commands = {"--help": exe + ["--help"], "validate": exe + ["validate", args.job],
                "render": exe + ["render", args.job, "--out", out_dir]}
    baseline = cold_seconds([sys.executable, "-c", "pass"], args.repeats)
    today = datetime.date.today().isoformat()
    rows = []
    print(f"python startup alone: {statistics.median(baseline):.3f} s (median of {args.repeats})")
    for name, argv in commands.items():
        times = cold_seconds(argv, args.repeats)
        median = statistics.median(times)
        print(f"hpcinfer {name:<9} {median:.3f} s median, {min(times):.3f} s best "
              f"({args.repeats} cold runs)")
        rows.append({"engine": "hpcinfer-cli", "workload": name, "tp": 1, "output_tok_s": None,
                     "total_tok_s": None, "seconds": round(median, 4),
                     "best_seconds": round(min(times), 4), "python_startup_s":
                     round(statistics.median(baseline), 4), "repeats": args.repeats,
                     "load_avg_1m": os.getloadavg()[0], "device": "cpu", "date": today})
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"cli_latency-{today}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
