"""Grammar matchers in worker processes: the structured-outputs host work spread over cores.

Why processes: a step of a large constrained batch costs the host ~10-25 us a row in xgrammar
(accept the sampled token, fill the next bitmask), 3-6 ms for 256 rows, and that sits on the
step's critical path. xgrammar's own thread pool (BatchGrammarMatcher(max_threads)) and
Python threads calling it do not run side by side (measured 2026-12-03: 2 threads used 1.1
cores and were slower than 1, on 2 cores and on a 16-core H200 host, with one or one copy
per thread of the compiled grammar), while separate processes do. So each worker process
owns the matchers of a share of the sequences and, for one round trip a step, accepts their
tokens and fills their next masks at once.

One ``GrammarWorkers`` per StructuredOutputs. Each constrained sequence gets a slot: the
worker ``slot % num_workers`` keeps its matcher, and row ``slot`` of a shared-memory
staging buffer holds its next mask, filled when the matcher starts and after every token it
accepts (unless that token ended it). ``accept`` sends each worker its rows' tokens and
returns (accepted, terminated) per row; ``gather`` copies the staged masks of a step's rows
into the caller's buffer. Starts and releases are queued and go with the next round trip
(a release before a start, so a freed slot is reused at once). The buffer is a file in
/dev/shm mapped by every process, unlinked as soon as the workers have mapped it; it doubles
when the slots outgrow it (between round trips, when no worker writes).

The workers are plain ``python -m hpcinfer.engine.grammar_workers FD`` subprocesses, not
multiprocessing's spawn: spawn re-runs the user's main script in each child, which breaks a
script without an ``if __name__ == "__main__":`` guard (vLLM's examples and users' scripts
often have none). Messages are pickled over one socket per worker (multiprocessing's
Connection); every message gets exactly one reply, so the sockets stay in order. A worker
whose engine process dies reads EOF and exits. A worker that dies or raises fails the next round trip with a
RuntimeError naming it (the engine stops; nothing is silently unconstrained).
"""
from __future__ import annotations

import heapq
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

INITIAL_SLOTS = 256


@dataclass
class _Message:
    """One round trip's work for one worker, applied in this order."""
    grammars: dict = field(default_factory=dict)   # key -> serialized compiled grammar
    resize: tuple | None = None                    # (path of the new staging file, slots)
    releases: list = field(default_factory=list)   # slots
    starts: list = field(default_factory=list)     # (slot, grammar key)
    accepts: list = field(default_factory=list)    # (slot, token id)


class RemoteMatcher:
    """``seq.grammar`` when the matcher lives in a worker: what the engine asks of a matcher
    on its own thread (is it terminated; accept one token), answered from the last round trip
    or by one more."""

    __slots__ = ("pool", "slot", "terminated", "__weakref__")

    def __init__(self, pool: GrammarWorkers, slot: int):
        self.pool = pool
        self.slot = slot
        self.terminated = False

    def is_terminated(self) -> bool:
        return self.terminated

    def accept_token(self, token_id: int) -> bool:
        return self.pool.accept([self], [token_id])[0]


class GrammarWorkers:
    def __init__(self, tokenizer_info, num_workers: int, num_words: int):
        self.num_workers = num_workers
        self.num_words = num_words
        info_json = tokenizer_info.serialize_json()
        path, self._staging = self._segment(INITIAL_SLOTS)
        self._conns, self._procs = [], []
        env = dict(os.environ)   # the workers import this package as we did
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        for w in range(num_workers):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "hpcinfer.engine.grammar_workers", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
            theirs.close()
            self._conns.append(Connection(ours.detach()))
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _shutdown, self._conns, self._procs)
        for conn in self._conns:
            conn.send((info_json, path, INITIAL_SLOTS))
        self._messages = [_Message() for _ in range(num_workers)]
        self._sent_grammars: list[set] = [set() for _ in range(num_workers)]
        self._grammar_json: dict = {}   # key -> serialized, for workers that lack it
        self._free: list[int] = []      # released slots, lowest first
        self._next_slot = 0
        self._released: list[int] = []  # appended by finalizers (any thread, any time)
        self._unlink_after_round_trip: str | None = path   # once every worker has mapped it
        self._round_trip()

    # --- the matchers ---
    def start(self, key, compiled) -> RemoteMatcher:
        """A matcher of ``compiled`` (cached as ``key``) in a worker, whose first mask is
        staged with the next round trip. Its slot is released when the handle is collected
        (the sequence holding it is gone)."""
        self._take_released()
        slot = heapq.heappop(self._free) if self._free else self._new_slot()
        w = slot % self.num_workers
        if key not in self._sent_grammars[w]:
            if key not in self._grammar_json:
                self._grammar_json[key] = compiled.serialize_json()
            self._messages[w].grammars[key] = self._grammar_json[key]
            self._sent_grammars[w].add(key)
        self._messages[w].starts.append((slot, key))
        handle = RemoteMatcher(self, slot)
        weakref.finalize(handle, self._released.append, slot)
        return handle

    def accept(self, matchers: list[RemoteMatcher], tokens: list[int]) -> list[bool]:
        """Each matcher accepts its token (and stages its next mask); whether it did. Each
        handle's ``terminated`` is updated."""
        for m, token in zip(matchers, tokens):
            self._messages[m.slot % self.num_workers].accepts.append((m.slot, int(token)))
        replies = self._round_trip()
        taken = [0] * self.num_workers
        accepted = []
        for m in matchers:
            w = m.slot % self.num_workers
            ok, m.terminated = replies[w][taken[w]]
            taken[w] += 1
            accepted.append(ok)
        return accepted

    def gather(self, matchers: list[RemoteMatcher], out: np.ndarray, rows: list[int]) -> None:
        """Copy the staged mask of ``matchers[k]`` into ``out[rows[k]]`` (int32 words)."""
        if any(m.starts or m.releases or m.resize is not None for m in self._messages):
            self._round_trip()   # matchers started since the last accepts: their first masks
        num = len(matchers)
        slots = np.fromiter((m.slot for m in matchers), dtype=np.int64, count=num)
        if rows == list(range(num)):
            np.take(self._staging, slots, axis=0, out=out[:num])
        else:
            out[rows] = self._staging[slots]

    def close(self) -> None:
        self._finalizer()

    # --- plumbing ---
    def _new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        if slot >= self._staging.shape[0]:
            self._grow(2 * self._staging.shape[0])
        return slot

    def _grow(self, slots: int) -> None:
        path, staging = self._segment(slots)
        staging[:self._staging.shape[0]] = self._staging
        self._staging = staging
        self._unlink_after_round_trip = path
        for message in self._messages:
            message.resize = (path, slots)

    def _segment(self, slots: int) -> tuple[str, np.ndarray]:
        """A new staging buffer: a file in shared memory (/dev/shm where there is one)."""
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="hpcinfer-grammar-", suffix=".masks", dir=folder)
        os.close(fd)
        return path, _map(path, slots, self.num_words, create=True)

    def _take_released(self) -> None:
        while self._released:
            slot = self._released.pop()
            self._messages[slot % self.num_workers].releases.append(slot)
            heapq.heappush(self._free, slot)

    def _round_trip(self) -> list[list]:
        self._take_released()
        try:
            return self._exchange()
        finally:
            if self._unlink_after_round_trip is not None:   # mapped by all (or failed)
                os.unlink(self._unlink_after_round_trip)
                self._unlink_after_round_trip = None

    def _exchange(self) -> list[list]:
        messages, self._messages = self._messages, [_Message() for _ in self._conns]
        for w, (conn, message) in enumerate(zip(self._conns, messages)):
            try:
                conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
                raise self._died(w) from exc
        replies = []
        for w, conn in enumerate(self._conns):
            try:
                reply = conn.recv()
            except (EOFError, ConnectionResetError) as exc:
                raise self._died(w) from exc
            if isinstance(reply, str):
                raise RuntimeError(f"structured outputs: grammar worker {w} failed: {reply}")
            replies.append(reply)
        return replies

    def _died(self, w: int) -> RuntimeError:
        proc = self._procs[w]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "unknown (still running)"
        return RuntimeError(
            f"structured outputs: grammar worker {w} (pid {proc.pid}) exited with code "
            f"{code}; the constrained rows cannot go on. Out of memory is the usual "
            "cause: see the job's stderr; HPCINFER_GRAMMAR_WORKERS=0 keeps the matchers in "
            "the engine's process")


def _shutdown(conns, procs) -> None:
    for conn in conns:
        try:
            conn.send(None)
            conn.close()
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _map(path: str, slots: int, num_words: int, create: bool = False) -> np.ndarray:
    if create:
        os.truncate(path, slots * num_words * 4)
    # a plain ndarray over the mapping (np.take on a memmap subclass is slower)
    return np.asarray(np.memmap(path, dtype=np.int32, mode="r+", shape=(slots, num_words)))


def _serve(conn: Connection) -> None:
    """A worker's loop: apply each message (grammars, resize, releases, starts, accepts),
    reply with (accepted, terminated) per accept, or a string saying what went wrong."""
    import torch
    import xgrammar as xgr
    torch.set_num_threads(1)
    # Signals are the engine's to handle (a Slurm preemption's SIGTERM, Ctrl-C reach every
    # process of the job): a worker goes on until the engine closes its socket or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    info_json, path, slots = conn.recv()
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    num_words = (info.vocab_size + 31) // 32
    staging = torch.from_numpy(_map(path, slots, num_words))
    grammars, matchers = {}, {}
    batch = xgr.BatchGrammarMatcher(1)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message is None:
            break
        try:
            for key, text in message.grammars.items():
                grammars[key] = xgr.CompiledGrammar.deserialize_json(text, info)
            if message.resize is not None:
                staging = torch.from_numpy(_map(*message.resize, num_words))
            for slot in message.releases:
                matchers.pop(slot, None)
            fill = []
            for slot, key in message.starts:
                matchers[slot] = xgr.GrammarMatcher(grammars[key])
                fill.append(slot)
            reply = []
            if message.accepts:
                rows = [matchers[slot] for slot, _ in message.accepts]
                oks = batch.batch_accept_token(rows, [t for _, t in message.accepts])
                for (slot, _), m, ok in zip(message.accepts, rows, oks):
                    ended = m.is_terminated()
                    reply.append((ok, ended))
                    if ok and not ended:
                        fill.append(slot)
            if fill:
                batch.batch_fill_next_token_bitmask([matchers[s] for s in fill], staging, fill)
        except Exception:   # noqa: BLE001  (said to the engine, which raises it)
            reply = traceback.format_exc(limit=4)
        conn.send(reply)


def default_num_workers() -> int:
    """HPCINFER_GRAMMAR_WORKERS, else 0 (the matchers in the engine's process). Off by default
    until a GPU host shows the round trip paying: on the 2-core development VM two workers
    were slower than none (docs/structured-outputs.md, "Grammar workers")."""
    env = os.environ.get("HPCINFER_GRAMMAR_WORKERS", "0")
    try:
        return max(0, int(env))
    except ValueError:
        raise ValueError(f"HPCINFER_GRAMMAR_WORKERS={env!r} is not a number of worker "
                         "processes (0 keeps the grammar matchers in the engine)") from None

if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
