"""A replica's run: the driver's side of the protocol and the follower's whole job.

Driver (replica rank 0), in task.py's order: decide whether there is work and **announce**
it (followers load the engine only then), load a ``DriverEngine`` (replay.py: its calls are
replayed by the followers), run the shards, then **release** every follower with the
driver's own exit code. So the driver alone decides when every rank stops (the warning
signal reaches all ranks; only the driver's flag counts) and with which code: all ranks of a
replica exit with the same status, which is what the job script acts on.

Follower: wait for the announcement, load the same engine, replay until released. It never
reads input rows nor writes output; its own stop flag only shows up in its log.

Failures (lifeline.py tells which rank and host): a lost peer -> EXIT_LOST_RANK (4, the job
script requeues), a peer that failed with an error -> 1; the process that failed says why
before it exits.
"""
from __future__ import annotations

import logging
import time

from hpcinfer.worker.lifeline import EXIT_LOST_RANK
from hpcinfer.worker.ranks import Replica

log = logging.getLogger("hpcinfer.worker")


class DriverSide:
    """The driver's protocol state: announced yet? engine replaying? released?"""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.announced = False
        self.channel = None          # replay.CommandChannel once the engine is loaded
        self.released = False

    @property
    def has_followers(self) -> bool:
        return self.replica.world is not None

    def make_engine(self, config):
        """Announce "load", then build the engine (a DriverEngine when there are followers)."""
        if not self.has_followers:   # one rank, or one process that spawns the others
            from hpcinfer.engine.distributed_runner import create_engine
            return create_engine(config)
        from hpcinfer.distributed.replay import CommandChannel, DriverEngine
        self.replica.announce({"load": True})
        self.announced = True
        self.channel = CommandChannel(self.replica.group)
        return DriverEngine(config, self.channel)

    def release(self, code: int, reason: str, clean: bool = True) -> None:
        """Tell the followers to exit with ``code``. ``clean``: they wait for our next
        message (between steps), so the replay stop reaches them; otherwise (an error in the
        middle of a step) only the lifeline does."""
        if not self.has_followers or self.released:
            return
        self.released = True
        lifeline = self.replica.lifeline
        lifeline.say_exit(code, reason)
        try:
            if not self.announced:
                self.replica.announce({"exit": code, "reason": reason})
            elif clean and self.channel is not None:
                self.channel.stop(code)
        except Exception as exc:  # noqa: BLE001 - a follower is gone: the lifeline told the rest
            log.warning("could not release the followers cleanly (%s); they exit on the "
                        "lifeline", exc)

    def settle(self, code: int, stop, metrics, started: float,
               reason: str = "the driver finished") -> int:
        """The exit code once the shards stopped: ``code``, unless a follower was lost
        meanwhile (srun's SIGTERM to the survivors can beat the failing collective: the
        stop flag then ended the loop cleanly, but the job lost a rank all the same)."""
        if not self.has_followers:
            return code
        trouble = self.replica.lifeline.wait_trouble(1.0 if stop.is_set else 0.0)
        if trouble is None:
            self.release(code, reason)
            return code
        return self._lost(trouble, metrics, started)

    def on_error(self, exc: BaseException, metrics, started: float) -> int | None:
        """A lost or failed follower behind ``exc``: log it, release the rest, exit code.
        None: the error is the driver's own."""
        trouble = self.replica.lifeline.wait_trouble() if self.has_followers else None
        if trouble is None:
            self.release(1, f"the driver failed: {type(exc).__name__}: {exc}", clean=False)
            return None
        return self._lost(trouble, metrics, started)

    def _lost(self, trouble, metrics, started: float) -> int:
        message = self.replica.lifeline.report(trouble)
        self.release(trouble.exit_code, message, clean=False)
        metrics.write({"event": "finish", "status": "lost_rank" if trouble.lost else "failed",
                       "message": message, "lost_rank": trouble.rank,
                       "lost_host": trouble.host, "seconds": round(time.time() - started, 3)})
        return trouble.exit_code


def run_follower(cfg, replica: Replica, stop, metrics, make_config) -> int:
    """A follower's whole job; returns its exit code (the driver's)."""
    place = replica.place
    decision = replica.announce({})
    if "exit" in decision:
        log.info("%s: the driver exits %d before loading the model (%s); so do I", place.label,
                 decision["exit"], decision.get("reason", ""))
        metrics.write({"event": "finish", "status": "follower", "exit_code": decision["exit"]})
        return int(decision["exit"])
    from hpcinfer.distributed.replay import follow
    from hpcinfer.engine.llm_engine import LLMEngine
    try:
        engine = LLMEngine(make_config())
        log.info("%s: follower %d of replica %d ready; replaying the driver's steps",
                 place.label, place.replica_rank, place.replica)
        code = follow(engine, replica.group)
    except Exception as exc:  # noqa: BLE001 - classified below: lost peer, driver's word, own bug
        return _follower_error(exc, replica, metrics)
    if stop.is_set:
        log.info("%s: had received %s; stopped at the driver's word (exit %d)", place.label,
                 stop.signal_name, code)
    metrics.write({"event": "finish", "status": "follower", "exit_code": code})
    return code


def _follower_error(exc: Exception, replica: Replica, metrics) -> int:
    lifeline = replica.lifeline
    said = lifeline.driver_exit
    if said is None:
        trouble = lifeline.wait_trouble()
        said = lifeline.driver_exit        # the driver's goodbye may have come meanwhile
        if said is None and trouble is not None:
            message = lifeline.report(trouble)
            metrics.write({"event": "finish", "status": "lost_rank", "message": message,
                           "lost_rank": trouble.rank, "lost_host": trouble.host})
            return EXIT_LOST_RANK
    if said is not None:
        log.info("%s: the driver exits %d (%s); so do I", replica.place.label, said[0], said[1])
        return said[0]
    log.exception("%s: follower failed", replica.place.label)
    lifeline.say_error(f"{type(exc).__name__}: {exc}")
    metrics.write({"event": "finish", "status": "failed", "message": str(exc)})
    return 1
