"""A warning signal (USR2) or SIGTERM while the worker is still starting: the flag is set,
the process is not killed. `python -m hpcinfer.worker` installs the handler before it imports
the worker proper (hpcinfer/worker/__main__.py)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpcinfer.testing.worker_jobs import (
    job_config,
    make_job,
    prompt_rows,
    read_results,
    run_worker,
    start_worker,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGTERM"])
def test_signal_during_worker_imports_sets_the_flag(sig):
    # `python -m hpcinfer.worker` with hpcinfer.worker.task served by an import hook that
    # sends the signal while that import runs (the worst moment: long before main()) and
    # whose main reports the flag it was handed. Without the early handler the process dies
    # of the signal (rc -12 / -15).
    harness = textwrap.dedent(f"""
        import importlib.abc, importlib.util, os, runpy, signal, sys

        def main(stop=None):
            print("flag:", stop.signal_name if stop is not None else "no flag passed")
            return 3 if stop is not None and stop.is_set else 0

        class KillOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "hpcinfer.worker.task":
                    return importlib.util.spec_from_loader(name, self)
                return None
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                os.kill(os.getpid(), signal.{sig})
                module.main = main

        sys.meta_path.insert(0, KillOnImport())
        runpy.run_module("hpcinfer.worker", run_name="__main__", alter_sys=True)
    """)
    proc = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert f"flag: {sig}" in proc.stdout


def test_usr2_the_moment_the_handler_exists_exits_requeue_then_resume(tmp_path, model_dir):
    """The real worker, signalled as soon as /proc says it catches USR2 (before the model is
    loaded): exit 3 with nothing committed and no DONE; the rerun answers every row once."""
    num_rows = 6
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(num_rows))
    job_dir = make_job(tmp_path, job_config(model_dir, "data/a.jsonl"))
    log = tmp_path / "worker.log"
    proc = start_worker(job_dir, log_path=log)
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGUSR2):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.001)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == 3, log.read_text()[-3000:]
    assert "received SIGUSR2" in log.read_text()
    shard = job_dir / "shards" / "00000"
    assert not (shard / "DONE").exists()
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["row_index"] for r in records] == list(range(num_rows))


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process pid has a handler for sig (Linux: SigCgt in /proc/PID/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(mask >> (int(sig) - 1) & 1)
