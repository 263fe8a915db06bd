"""AsyncLLM (vLLM's ``vllm.v1.engine.async_llm.AsyncLLM``, also ``AsyncLLMEngine``): the same
LLMEngine, stepped by a background thread, with results streamed to asyncio callers.

Ownership: only the loop thread touches the engine. Callers hand it commands through a
thread-safe queue (add, abort, stop); it posts each request's outputs to that request's
asyncio.Queue on the caller's event loop (``call_soon_threadsafe``). A thread rather than an
asyncio task because a step is seconds of blocking torch work that would stall the caller's
event loop; torch releases the GIL while it computes.

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=path))
    params = SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA)
    async for out in engine.generate("Hello", params, request_id="r1"):
        print(out.outputs[0].text, end="")   # DELTA: only the new text
    engine.shutdown()
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncGenerator

from hpcinfer.engine.llm_engine import LLMEngine
from hpcinfer.engine.outputs import RequestOutput
from hpcinfer.engine.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shutdown, or a step raised): no more requests."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name="hpcinfer-engine-loop",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args, start_engine_loop: bool = True,
                         usage_context=None, **_vllm_only) -> AsyncLLM:
        """vLLM's constructor; ``start_engine_loop``/``usage_context`` are accepted (the loop
        always starts)."""
        return cls(LLMEngine.from_engine_args(engine_args))

    # --- the caller's side (any asyncio event loop) ---
    async def generate(self, prompt, sampling_params: SamplingParams | None, request_id: str,
                       *, lora_request=None, priority: int = 0,
                       **_vllm_only) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request's RequestOutputs until it finishes (``output_kind`` of the
        params: CUMULATIVE states, DELTA new text only, FINAL_ONLY the last one). A bad
        request raises ValueError here; leaving the loop early aborts the request."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r}: a request with this id is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", request_id, prompt, sampling_params, lora_request))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests (unknown ids are ignored); their generate() streams end."""
        self._abort(request_id)

    async def get_tokenizer(self, lora_request=None):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the loop thread (after the step in progress) and the engine's worker ranks."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join()
        close = getattr(self.engine, "shutdown", None)
        if close is not None:
            close()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def errored(self) -> bool:
        return self._dead is not None and not isinstance(self._dead, EngineDeadError)

    def _abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self._streams.pop(rid, None)
        self._commands.put(("abort", ids))

    # --- the loop thread ---
    def _run_loop(self) -> None:
        try:
            while True:
                # Block for work while idle; otherwise take what has arrived and step.
                block = not self.engine.has_unfinished_requests()
                if not self._handle_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._post(out.request_id, out, out.finished)
            self._dead = EngineDeadError("shut down")
        except BaseException as e:  # a failed step ends every stream with its error
            log.exception("the engine loop failed")
            self._dead = e
        for rid in list(self._streams):
            self._post(rid, EngineDeadError(f"the engine loop has stopped: {self._dead}"), True)

    def _handle_commands(self, block: bool) -> bool:
        """Run the queued commands; False when asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "abort":
                self.engine.abort_request(command[1])
            elif kind == "add":
                self._add(*command[1:])

    def _add(self, request_id: str, prompt, params, lora_request) -> None:
        if request_id not in self._streams:  # aborted before it was added
            return
        try:
            self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
        except ValueError as e:
            self._post(request_id, e, True)

    def _post(self, request_id: str, item, is_last: bool) -> None:
        stream = self._streams.pop(request_id, None) if is_last else self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                self.engine.abort_request(request_id)


AsyncLLMEngine = AsyncLLM
