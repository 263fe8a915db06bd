"""`python -m hpcinfer.worker JOBDIR`: what the rendered job scripts run on every rank."""
from __future__ import annotations

import sys

from hpcinfer.worker.task import main

if __name__ == "__main__":
    sys.exit(main())
