"""Where the step loop's thread ran during a timed rep, for telling why one process of a
host-sensitive workload is slower than the next (issue 22: workload A's output tok/s spread
1.17x over three processes on one H200, 56.9-59.7k in one process's three reps against
70.9-72.4k in another's, bench/results/throughput-A-blas-*).

Linux only (/proc and /sys; elsewhere every field is None). ``topology()``: the CPUs this
process may use, their SMT sibling groups and NUMA nodes; ``Placement`` around a rep: the
logical CPU the calling thread was on at its start and end, how often the scheduler moved it
(``migrations``) and took the CPU from it (``involuntary_switches``), and how often it gave
the CPU up itself (``voluntary_switches``: waits, e.g. for the GPU).
"""
from __future__ import annotations

import os
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")


def topology() -> dict:
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    groups, nodes = set(), {}
    for cpu in allowed:
        siblings = _read(_SYS_CPU / f"cpu{cpu}/topology/thread_siblings_list")
        if siblings is not None:
            groups.add(siblings)
        for node in _SYS_CPU.glob(f"cpu{cpu}/node*"):
            nodes.setdefault(node.name.removeprefix("node"), []).append(cpu)
    return {"allowed_cpus": allowed, "smt_groups": sorted(groups),
            "numa_nodes": {k: v for k, v in sorted(nodes.items())}}


class Placement:
    """``with Placement() as p: ...``, then ``p.summary``."""

    def __enter__(self) -> "Placement":
        self._before = _thread_counters()
        return self

    def __exit__(self, *exc) -> None:
        after = _thread_counters()
        before = self._before
        self.summary = {"cpu_start": before["cpu"], "cpu_end": after["cpu"]}
        for key in ("migrations", "involuntary_switches", "voluntary_switches"):
            self.summary[key] = (None if before[key] is None or after[key] is None
                                 else after[key] - before[key])


def _thread_counters() -> dict:
    out = {"cpu": None, "migrations": None, "involuntary_switches": None,
           "voluntary_switches": None}
    stat = _read(Path("/proc/thread-self/stat"))
    if stat is not None:   # field 39 (processor), counted after the ")" of the command name
        fields = stat.rsplit(")", 1)[1].split()
        out["cpu"] = int(fields[36])
    for line in (_read(Path("/proc/thread-self/status")) or "").splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            out["voluntary_switches"] = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            out["involuntary_switches"] = int(line.split()[1])
    for line in (_read(Path("/proc/thread-self/sched")) or "").splitlines():
        if line.startswith("se.nr_migrations"):
            out["migrations"] = int(line.split(":")[1])
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
