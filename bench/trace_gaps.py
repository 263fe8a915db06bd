"""Where a GPU waits, from a Chrome trace of torch.profiler (bench/vision.py --trace).

Prints the span of the GPU work, how much of it some kernel, copy or memset ran, the idle
time by gap size, and the largest gaps with the host ops that ran during each (longest
first, with their thread): a gap whose host ops are all tiny is the host waiting for
something else (the GIL, a lock), one under a long host op is that op.

    python bench/trace_gaps.py vision-trace.json.gz [--top 8]

Used on workload V's traces (docs/vision.md: gaps of 5-18 ms, multiples of the 5 ms GIL
switch interval, while the preprocessing threads ran).
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

GPU_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_BINS_US = (50, 500, 5000)   # small launch gaps, host stalls, long waits


def load_events(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def gpu_gaps(events: list[dict]) -> dict:
    """{"first_us", "span_us", "busy_us", "gaps": [(gap_us, start_us)], longest first}: the
    union of the GPU events' intervals and the holes between them."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_KINDS and "dur" in e),
                 key=lambda e: e["ts"])
    if not gpu:
        return {"first_us": 0.0, "span_us": 0.0, "busy_us": 0.0, "gaps": []}
    busy, gaps = 0.0, []
    start, end = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"]
    first = start
    for e in gpu[1:]:
        if e["ts"] > end:
            busy += end - start
            gaps.append((e["ts"] - end, end))
            start = e["ts"]
        end = max(end, e["ts"] + e["dur"])
    busy += end - start
    return {"first_us": first, "span_us": end - first, "busy_us": busy,
            "gaps": sorted(gaps, reverse=True)}


def host_ops_during(events: list[dict], start_us: float, end_us: float, top: int = 4
                    ) -> list[tuple[str, float, object]]:
    """(name, duration in us, thread id) of the longest host ops overlapping a window."""
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e
           and e["ts"] <= end_us and e["ts"] + e["dur"] >= start_us]
    ops.sort(key=lambda e: -e["dur"])
    return [(e["name"], e["dur"], e.get("tid")) for e in ops[:top]]


def report(path: str | Path, top: int = 8) -> str:
    events = load_events(path)
    found = gpu_gaps(events)
    span, busy, gaps = found["span_us"], found["busy_us"], found["gaps"]
    if not span:
        return f"{path}: no GPU events (a CPU-only trace?)"
    lines = [f"{path}: GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms "
             f"({100 * busy / span:.0f}%), idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps"]
    low = 0
    for high in (*GAP_BINS_US, float("inf")):
        inside = [g for g, _ in gaps if low < g <= high]
        label = f"> {low / 1e3:g} ms" if high == float("inf") else \
            f"{low / 1e3:g}-{high / 1e3:g} ms"
        lines.append(f"  gaps {label}: {len(inside)}, {sum(inside) / 1e3:.1f} ms")
        low = high
    for gap, at in gaps[:top]:
        ops = ", ".join(f"{name[:40]} {dur / 1e3:.2f} ms (tid {tid})"
                        for name, dur, tid in host_ops_during(events, at, at + gap))
        lines.append(f"  {gap / 1e3:6.2f} ms at +{(at - found['first_us']) / 1e3:.1f} ms: "
                     f"{ops or 'no host op'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a Chrome trace (.json or .json.gz) from torch.profiler")
    p.add_argument("--top", type=int, default=8, help="largest gaps to list")
    args = p.parse_args()
    print(report(args.trace, args.top))


if __name__ == "__main__":
    main()
