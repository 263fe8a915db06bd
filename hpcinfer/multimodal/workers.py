"""The checkpoint's image processor in worker processes, so the step loop keeps the GIL.

Why: transformers' image processors spend much of their ~8 ms an image (448x448, one core)
in Python holding the GIL. On threads beside the step loop they starved it: on one H200 the
step loop's ops of workload V were spread over 155 ms with 3-13 ms gaps while 8 threads
preprocessed (bench/vision.py --trace; docs/vision.md), and on a 2-core VM a step-loop
stand-in took 45 ms beside 8 preprocessing threads against 1.3 ms alone. In processes the
processor runs beside the step loop, not in turn with it.

``ProcessorWorkers`` starts ``n`` workers (``python -m hpcinfer.multimodal.workers``), each
sent the pickled processor once; ``run`` hands one processor call to an idle worker and
waits for its output (the wait releases the GIL). What the parent keeps doing itself is
light: splitting the outputs per image and the M-RoPE positions (the worker hashes the
images and casts the pixels to the encoder's dtype).

Nothing is lost when a worker is not there: ``run`` returns None while no worker is idle
(still starting, all busy, or dead), and the caller calls its own processor as before. A
worker that dies (killed, out of memory) is dropped with one warning; a processor that
raises in a worker raises ``ProcessorCallError`` with the processor's message, as the same
call in the parent would have. A worker exits when its stdin closes (``close()``, or this
process dying, even by SIGKILL).

Wire format: one frame = a header (8-byte little-endian lengths: the pickle's, the number of
out-of-band buffers, each buffer's), the pickle (protocol 5), then the buffers. Tensors
travel as numpy arrays whose data goes out of band: the reader reads each buffer straight
into its own bytearray (the read releases the GIL) and unpickles the arrays on top of them
without a copy. In the pickle, the pixels of one 448x448 image (2.4 MB in bf16) cost the
step loop's process ~1 ms of unpickling under the GIL (2-core VM, 2026-12-04); torch's own
reducer would write a zip.
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# HPCINFER_PREPROCESS_WORKERS=N sets the number of worker processes (0: preprocess on threads
# in this process, as before). Unset: min(MAX_WORKERS, cores // 2) with at least
# MIN_CORES cores, else none (a worker costs a Python process with transformers imported,
# ~300 MB; the cores are shared with the step loop and the threads that wait for workers).
ENV_WORKERS = "HPCINFER_PREPROCESS_WORKERS"
MAX_WORKERS = 8
MIN_CORES = 4


def default_num_workers() -> int:
    value = os.environ.get(ENV_WORKERS)
    if value is not None:
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"{ENV_WORKERS}={value!r}: set a number of worker processes "
                             "(0 preprocesses images on threads in this process)")
        return n
    cores = len(os.sched_getaffinity(0))
    return min(MAX_WORKERS, cores // 2) if cores >= MIN_CORES else 0


class ProcessorCallError(Exception):
    """The processor raised in a worker; str() is its message."""


class WorkerGone(Exception):
    pass


def write_frame(stream: BinaryIO, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    stream.write(struct.pack(f"<{2 + len(raws)}Q", len(data), len(raws),
                             *(r.nbytes for r in raws)))
    stream.write(data)
    for raw in raws:
        stream.write(raw)
    stream.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


def read_frame(stream: BinaryIO) -> Any:
    size, num_buffers = struct.unpack("<2Q", _read_exactly(stream, 16))
    sizes = struct.unpack(f"<{num_buffers}Q", _read_exactly(stream, 8 * num_buffers))
    data = _read_exactly(stream, size)
    buffers = []
    for nbytes in sizes:
        buffer = bytearray(nbytes)
        if nbytes and stream.readinto(buffer) < nbytes:
            raise EOFError
        buffers.append(buffer)
    return pickle.loads(data, buffers=buffers)


def _to_wire(out: Any, dtype: Any) -> dict:
    """The processor's BatchFeature as {key: numpy array or plain value}, floating tensors in
    ``dtype`` first (the encoder's: half the bytes of fp32 to copy and unpickle for bf16,
    which travels as its int16 bits: numpy has no bfloat16)."""
    import torch
    wire = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = (("bfloat16", value.view(torch.int16).numpy())
                     if value.dtype == torch.bfloat16 else value.numpy())
        wire[key] = value
    return wire


def _from_wire(out: dict) -> dict:
    import numpy as np
    import torch
    tensors = {}
    for key, value in out.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "bfloat16":
            value = torch.from_numpy(value[1]).view(torch.bfloat16)
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        tensors[key] = value
    return tensors


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# A worker's replies (2.4 MB of pixels for a 448x448 image) come through a pipe of 64 KiB
# by default: ~40 reads, each of which takes the GIL back. Linux lets a process widen its pipes
# to /proc/sys/fs/pipe-max-size (1 MiB by default): ~3 reads.
PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):   # not Linux, or a lower limit: the
        pass                                          # default pipe works


class _Worker:
    """One worker process; owned by one caller at a time (checked out of the idle queue)."""

    def __init__(self, payload: bytes, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpcinfer.multimodal.workers"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.tx, self.rx = self.proc.stdin, self.proc.stdout
        self._payload = payload
        _widen_pipe(self.rx.fileno())

    def start(self) -> None:
        """Send the processor and wait until the worker has loaded it (in a starter thread)."""
        try:
            self.tx.write(struct.pack("<2Q", len(self._payload), 0))
            self.tx.write(self._payload)
            self.tx.flush()
            self._payload = b""
            reply = read_frame(self.rx)
        except (OSError, EOFError, ValueError) as e:
            raise WorkerGone(f"exited while starting ({_why(e)}; exit code "
                             f"{self.proc.poll()})") from None
        if reply[0] != "ready":
            raise WorkerGone(f"could not load the processor: {reply[1]}")

    def call(self, request: tuple) -> dict:
        try:
            write_frame(self.tx, request)
            status, value = read_frame(self.rx)
        except (OSError, EOFError, ValueError) as e:
            raise WorkerGone(f"exited ({_why(e)}; exit code {self.proc.poll()})") from None
        if status == "error":
            raise ProcessorCallError(value)
        out, hashes = value
        return _from_wire(out), hashes

    def close(self) -> None:
        try:
            self.tx.close()     # the worker reads EOF and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.rx.close()


class ProcessorWorkers:
    """``n`` worker processes running ``processor``; see the module docstring."""

    def __init__(self, processor: Any, n: int):
        payload = pickle.dumps(processor, protocol=5)  # raises if it does not pickle
        env = dict(os.environ)
        # The worker imports hpcinfer from where this process did (a checkout or site dir),
        # runs one call at a time on one core, and never touches a GPU.
        here = str(Path(sys.modules["hpcinfer"].__path__[0]).parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._state = {"closed": False}   # shared with the finalizer, which may run first
        self._warned = False
        self._settled = threading.Condition(self._lock)   # a worker started or failed to
        self._num_settled = 0
        self.num_served = 0    # calls answered by a worker (the rest ran in the caller)
        self._n = n
        for _ in range(n):
            worker = _Worker(payload, env)
            self._workers.append(worker)
            threading.Thread(target=self._start, args=(worker,), daemon=True,
                             name="hpcinfer-preprocess-start").start()
        self._finalizer = weakref.finalize(self, _close_all, self._workers, self._state)

    def _start(self, worker: _Worker) -> None:
        try:
            worker.start()
        except WorkerGone as e:
            self._drop(worker, e)
        else:
            self._idle.put(worker)
        with self._settled:
            self._num_settled += 1
            self._settled.notify_all()

    def wait_started(self, timeout: float) -> bool:
        """Wait until every worker has loaded the processor or failed to; False on timeout."""
        with self._settled:
            return self._settled.wait_for(lambda: self._num_settled == self._n, timeout)

    @property
    def num_alive(self) -> int:
        with self._lock:
            return len(self._workers)

    def run(self, text: str, images: list, add_special_tokens: bool, kwargs: dict,
            dtype: Any = None) -> tuple[dict, list[int]] | None:
        """(the processor's output, media.image_hash of each image) for one prompt from an
        idle worker, floating outputs in ``dtype`` (None: as the processor gives them); None
        when no worker is idle (the caller runs its own processor). ProcessorCallError: the
        processor raised."""
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            return None
        try:
            out = worker.call((text, images, add_special_tokens, kwargs, dtype))
        except WorkerGone as e:
            self._drop(worker, e)
            return None
        except ProcessorCallError:
            self._idle.put(worker)
            raise
        self._idle.put(worker)
        with self._lock:
            self.num_served += 1
        return out

    def _drop(self, worker: _Worker, why: Exception) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            warn, self._warned = not self._warned and not self._state["closed"], True
        if warn:
            log.warning("an image-preprocessing worker process %s; its prompts are "
                        "preprocessed in this process instead (nothing is lost)", why)
        try:
            worker.close()
        except OSError:
            pass

    def close(self) -> None:
        self._finalizer()


def _close_all(workers: list[_Worker], state: dict) -> None:
    """close(), garbage collection or interpreter exit: stop every worker (one still
    starting then ends its start with EOF, and that is no reason to warn)."""
    state["closed"] = True
    for worker in list(workers):
        try:
            worker.close()
        except OSError:
            pass
    workers.clear()


def start_workers(processor: Any, n: int) -> ProcessorWorkers | None:
    """``n`` workers for ``processor`` (None for n == 0, or, with one warning, a processor
    that does not pickle: it then runs on threads in this process)."""
    if n <= 0:
        return None
    try:
        return ProcessorWorkers(processor, n)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        log.warning("this model's processor cannot be sent to worker processes (%s); images "
                    "are preprocessed on threads in this process", e)
        return None


def main() -> None:
    """The worker: load the processor from the first frame, then answer calls until EOF."""
    from hpcinfer.multimodal.media import image_hash
    rx, tx = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # prints from libraries must not corrupt the frames
    try:
        processor = read_frame(rx)
    except EOFError:
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which drops this worker
        write_frame(tx, ("error", f"{type(e).__name__}: {e}"))
        return
    write_frame(tx, ("ready", None))
    while True:
        try:
            text, images, add_special_tokens, kwargs, dtype = read_frame(rx)
        except EOFError:
            return
        try:
            out = processor(text=[text], images=images or None, return_tensors="pt",
                            add_special_tokens=add_special_tokens, **kwargs)
            reply = ("ok", (_to_wire(out, dtype), [image_hash(image) for image in images]))
        except Exception as e:  # noqa: BLE001 - the parent raises it for this prompt
            reply = ("error", str(e))
        try:
            write_frame(tx, reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    main()
