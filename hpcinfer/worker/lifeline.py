"""Lifeline: one TCP connection from each follower rank to its replica's driver.

Why: when a rank dies, the survivors' next collective fails with gloo's "Connection closed
by peer" (or NCCL's timeout), which names neither the rank nor its host. The lifeline tells
exactly who went: the kernel closes a dead process's sockets at once (kill -9, out of
memory, a crash), so the other end sees EOF within milliseconds, on any node.

Lines on the wire (text, one per line)::

    follower -> driver   hello RANK HOST PID          once, at start
                         error TEXT                   the follower is about to exit 1
    driver -> followers  exit CODE TEXT               the driver leaves with CODE

A peer that goes without a word (EOF with no ``exit``/``error`` line before it) is *lost*.
The monitor thread records the first loss or failure (``self.trouble``); the main thread
asks for it when its collective fails (``wait_trouble``) and exits with the matching code.
If the main thread is stuck (a collective that never errors), the monitor itself logs the
message and ends the process after ``grace_s`` seconds: no rank outlives a lost peer by
more than that.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("hpcinfer.worker")

EXIT_LOST_RANK = 4     # = compile.plan.EXIT_LOST_RANK (kept here: no login-side import)


@dataclass(frozen=True)
class Trouble:
    """What happened to a peer: lost (gone without a word) or failed (it said why)."""
    rank: int
    host: str
    pid: int
    lost: bool
    detail: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_LOST_RANK if self.lost else 1

    def message(self, own_label: str, replica: int) -> str:
        who = f"rank {self.rank} (host {self.host}, pid {self.pid}) of replica {replica}"
        if self.lost:
            return (f"{own_label}: lost {who}: its process ended without a word (killed, e.g. "
                    "kill -9 or out of memory, or its node failed); committed rows are kept "
                    f"and in-flight rows are redone: exiting {EXIT_LOST_RANK} so the job "
                    "script requeues the job")
        return (f"{own_label}: {who} failed: {self.detail}; exiting 1 (not requeued: see "
                "that rank's traceback above)")


class Lifeline:
    """The driver's (``serve``) or a follower's (``connect``) end of the lifelines."""

    def __init__(self, own_label: str, replica: int, grace_s: float = 20.0):
        self.own_label = own_label
        self.replica = replica
        self.grace_s = grace_s
        self.trouble: Trouble | None = None
        self.closing = False                   # our own exit started: EOFs are expected
        self._event = threading.Event()
        self._reported = threading.Lock()
        self._peers: dict[socket.socket, tuple[int, str, int]] = {}  # sock -> (rank, host, pid)
        self._buffers: dict[socket.socket, bytes] = {}
        self._errors: dict[socket.socket, str] = {}
        self._driver_exit: tuple[int, str] | None = None

    # --- set-up ---
    @classmethod
    def serve(cls, own_label: str, replica: int, bind_addr: str, num_followers: int,
              publish, timeout_s: float) -> Lifeline:
        """Driver: listen, ``publish((addr, port))`` to the followers, take their hellos."""
        line = cls(own_label, replica)
        server = socket.create_server(("" if bind_addr not in ("127.0.0.1", "localhost")
                                       else bind_addr, 0))
        server.settimeout(timeout_s)
        publish((bind_addr, server.getsockname()[1]))
        with server:
            for _ in range(num_followers):
                conn, _ = server.accept()
                conn.settimeout(timeout_s)
                rank, host, pid = _read_line(conn).split(" ", 1)[1].split()
                conn.settimeout(None)
                line._peers[conn] = (int(rank), host, int(pid))
        threading.Thread(target=line._monitor, name="lifeline", daemon=True).start()
        return line

    @classmethod
    def connect(cls, own_label: str, replica: int, address: tuple[str, int], rank: int,
                driver: tuple[int, str, int], timeout_s: float) -> Lifeline:
        """Follower: connect to the driver ((rank, host, pid)) and say hello."""
        line = cls(own_label, replica)
        conn = socket.create_connection(address, timeout=timeout_s)
        conn.settimeout(None)
        conn.sendall(f"hello {rank} {socket.gethostname()} {os.getpid()}\n".encode())
        line._peers[conn] = driver
        threading.Thread(target=line._monitor, name="lifeline", daemon=True).start()
        return line

    # --- what the main thread calls ---
    def wait_trouble(self, timeout_s: float = 5.0) -> Trouble | None:
        """The lost/failed peer, waiting a little: the collective may fail a moment before
        the monitor reads the EOF."""
        self._event.wait(timeout_s)
        return self.trouble

    def report(self, trouble: Trouble) -> str:
        """Log the message once (main thread or monitor, whichever comes first)."""
        text = trouble.message(self.own_label, self.replica)
        if self._reported.acquire(blocking=False):
            log.error("%s", text)
        return text

    def say_exit(self, code: int, reason: str) -> None:
        """Driver: tell every follower it leaves with ``code`` (before its own exit)."""
        self.closing = True
        self._send_all(f"exit {int(code)} {' '.join(reason.split())}\n")

    def say_error(self, text: str) -> None:
        """Follower: tell the driver this rank is about to exit 1, and why."""
        self.closing = True
        self._send_all(f"error {' '.join(text.split())[:2000]}\n")

    @property
    def driver_exit(self) -> tuple[int, str] | None:
        """(code, reason) the driver said it exits with (followers), if it said so."""
        return self._driver_exit

    def _send_all(self, text: str) -> None:
        for conn in list(self._peers):
            try:
                conn.sendall(text.encode())
            except OSError:
                pass   # that peer is gone already; the monitor reports it

    # --- the monitor thread ---
    def _monitor(self) -> None:
        sel = selectors.DefaultSelector()
        for conn in self._peers:
            sel.register(conn, selectors.EVENT_READ)
        while self._peers:
            for key, _ in sel.select(timeout=1.0):
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self._on_data(conn, data)
                    continue
                sel.unregister(conn)
                self._on_eof(conn)

    def _on_data(self, conn: socket.socket, data: bytes) -> None:
        buffer = self._buffers.get(conn, b"") + data
        *lines, self._buffers[conn] = buffer.split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode("utf-8", "replace").partition(" ")
            if kind == "error":
                self._errors[conn] = rest
            elif kind == "exit":
                code, _, reason = rest.partition(" ")
                self._driver_exit = (int(code), reason)
                self._exit_later(int(code), f"the driver exits {code} ({reason})",
                                 self.grace_s)

    def _on_eof(self, conn: socket.socket) -> None:
        rank, host, pid = self._peers.pop(conn)
        conn.close()
        if self.closing or self._driver_exit is not None:
            return                             # an expected goodbye
        detail = self._errors.get(conn, "")
        trouble = Trouble(rank, host, pid, lost=not detail, detail=detail)
        if self.trouble is None:
            self.trouble = trouble
            self._event.set()
            self._exit_later(trouble.exit_code, None, self.grace_s, trouble)

    def _exit_later(self, code: int, reason: str | None, delay_s: float,
                    trouble: Trouble | None = None) -> None:
        """End the process after ``delay_s`` unless the main thread exits first."""
        def fire():
            time.sleep(delay_s)
            if trouble is not None:
                self.report(trouble)
            log.error("%s: still running %.0f s after %s: exiting %d now", self.own_label,
                      delay_s, reason or "losing a peer", code)
            logging.shutdown()
            os._exit(code)
        threading.Thread(target=fire, name="lifeline-exit", daemon=True).start()


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("a follower closed its lifeline before saying hello")
        data += chunk
    return data.decode().strip()
