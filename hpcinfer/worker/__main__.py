"""`python -m hpcinfer.worker JOBDIR`: what the rendered job scripts run on every rank."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    # First, before the heavier imports: a warning signal (USR2) or SIGTERM that arrives
    # while the worker is still starting must set the stop flag, not end the process (the
    # default action of both). What is left is the interpreter's own start-up; a signal
    # there kills the worker and the job script still requeues (docs/slurm.md).
    from hpcinfer.worker.signals import StopFlag
    stop = StopFlag()
    stop.install()

    from hpcinfer.worker.task import main
    sys.exit(main(stop=stop))
