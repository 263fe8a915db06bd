"""The stop flag: the configured warning signal (default USR2) and SIGTERM only set it.

Restarts are normal (docs/worker.md): the handler does nothing but record which signal came;
the loop sees the flag between engine steps, stops admitting rows, aborts what is in flight,
commits what finished and exits with EXIT_REQUEUE.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("hpcinfer.worker")


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None     # e.g. "SIGUSR2" once a signal arrived

    @property
    def is_set(self) -> bool:
        return self.signal_name is not None

    def install(self, warning_signal: str = "USR2") -> None:
        """Catch SIG<warning_signal> and SIGTERM (the only two the batch script forwards)."""
        for sig in {_signal(warning_signal), signal.SIGTERM}:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


def _signal(name: str) -> signal.Signals:
    name = str(name).upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        log.warning("unknown resilience.signal %r; catching SIGUSR2 instead", name)
        return signal.SIGUSR2
