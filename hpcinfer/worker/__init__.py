"""In-job worker (`python -m hpcinfer.worker JOBDIR`): preflight, then this task's shards
through the engine with exactly-once commits (task.py is the entry; docs/worker.md).

Exit codes: 0 done, 2 something to fix (message says what), 3 stopped by the warning signal
or SIGTERM after committing ("requeue me"), 4 a rank of this replica was lost (died or
stopped answering; the survivors name its rank and host, and the job script requeues:
lifeline.py), 1 a bug.
"""
