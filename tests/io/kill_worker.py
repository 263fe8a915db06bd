"""Subprocess for the kill test (run as a script, never collected): answer every shard of
one JSONL file through hpcinfer.io with frequent commits, so the test can kill -9 it anywhere.

usage: kill_worker.py INPUT JOB_DIR FORMAT NUM_SHARDS COMMIT_EVERY_ROWS
Prints "ready" once imports are done (the test times its kill from there).
"""
from __future__ import annotations

import sys
import types

from hpcinfer.io import ledger
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import InputSpec
from hpcinfer.io.shard_loop import process_shard
from hpcinfer.testing.io_corpus import reverse_answer


def main() -> None:
    path, job_dir, fmt_name, num_shards, commit_every = sys.argv[1:6]
    with open(path, "rb") as f:
        num_rows = sum(1 for _ in f)
    spec = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling",
                     passthrough=("topic",))
    fmt = make_format(fmt_name, id_name="id", passthrough=("topic",))
    per_shard = -(-num_rows // int(num_shards))
    print("ready", flush=True)
    for index in range(int(num_shards)):
        shard = types.SimpleNamespace(file=path, start=index * per_shard,
                                      stop=min(num_rows, (index + 1) * per_shard))
        process_shard(shard, spec, ledger.shard_dir(job_dir, index), fmt, reverse_answer,
                      commit_every_rows=int(commit_every), commit_every_s=3600)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
