"""Image prompts preprocessed in worker processes (multimodal/workers.py): the same token ids,
pixels, image hashes and M-RoPE positions as in this process, the same error for a prompt the
processor refuses, nothing lost when a worker is killed, and the workers gone after close()."""
from __future__ import annotations

import io
import logging
import os
import signal
import struct
import threading

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine import llm as llm_module
from hpcinfer.multimodal import workers as workers_module

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
QWEN_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
               "Describe.<|im_end|>\n<|im_start|>assistant\n")
START_S = 120   # the workers import transformers; two of them on a 2-core VM take ~10 s


@pytest.fixture(scope="module")
def llm():
    """A tiny Qwen2.5-VL (window attention, M-RoPE positions) with two worker processes."""
    import transformers

    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor, tiny_qwen2_vl
    path = str(tiny_qwen2_vl("2.5"))
    processor = qwen2_vl_image_processor(path, "2.5")
    original = transformers.AutoProcessor.from_pretrained
    saved = os.environ.get(workers_module.ENV_WORKERS)
    transformers.AutoProcessor.from_pretrained = (
        lambda where, *a, **k: processor if str(where) == path else original(where, *a, **k))
    os.environ[workers_module.ENV_WORKERS] = "2"
    try:
        llm = LLM(path, device="cpu", dtype="float32", max_model_len=512, max_num_seqs=8)
    finally:
        transformers.AutoProcessor.from_pretrained = original
        if saved is None:
            del os.environ[workers_module.ENV_WORKERS]
        else:
            os.environ[workers_module.ENV_WORKERS] = saved
    workers = llm.llm_engine.multimodal.workers
    assert workers is not None and workers.wait_started(START_S)
    assert workers.num_alive == 2
    yield llm
    llm.llm_engine.multimodal.close()


def _prompt(images, i: int = 0) -> dict:
    return {"prompt": QWEN_PROMPT, "multi_modal_data": {"image": images[i % len(images)]}}


def _in_this_process(llm, fn):
    mm = llm.llm_engine.multimodal
    workers, mm.workers = mm.workers, None
    try:
        return fn()
    finally:
        mm.workers = workers


def test_a_worker_processes_a_prompt_as_this_process_does(llm, images):
    mm = llm.llm_engine.multimodal
    served = mm.workers.num_served
    got = mm.process(_prompt(images), "0")
    assert mm.workers.num_served == served + 1
    want = _in_this_process(llm, lambda: mm.process(_prompt(images), "0"))
    assert got.token_ids == want.token_ids
    assert [(i.offset, i.length, i.hash) for i in got.mm_inputs.items] == \
        [(i.offset, i.length, i.hash) for i in want.mm_inputs.items]
    for a, b in zip(got.mm_inputs.items, want.mm_inputs.items):
        assert a.inputs.keys() == b.inputs.keys()
        for key in a.inputs:
            assert a.inputs[key].dtype == b.inputs[key].dtype
            assert torch.equal(a.inputs[key], b.inputs[key]), key
    assert (got.mm_inputs.rope_positions == want.mm_inputs.rope_positions).all()
    assert got.mm_inputs.rope_delta == want.mm_inputs.rope_delta


def test_generate_through_workers_gives_the_same_tokens(llm, images):
    prompts = [_prompt(images, i) for i in range(llm_module.MIN_PROMPTS_FOR_THREADS + 2)]
    workers = llm.llm_engine.multimodal.workers
    served = workers.num_served
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    # one thread per worker, each holding at most one: every call found an idle worker
    assert workers.num_served == served + len(prompts)
    want = _in_this_process(llm, lambda: [o.outputs[0].token_ids for o in llm.generate(
        prompts, GREEDY, use_tqdm=False)])
    assert got == want


def test_a_refused_prompt_gets_the_error_it_gets_in_this_process(llm, images):
    mm = llm.llm_engine.multimodal
    bad = {"prompt": QWEN_PROMPT, "multi_modal_data": {"image": [images[0], images[1]]}}
    with pytest.raises(ValueError) as in_worker:
        mm.process(bad, "7")
    with pytest.raises(ValueError) as here:
        _in_this_process(llm, lambda: mm.process(bad, "7"))
    assert str(in_worker.value) == str(here.value)
    assert "request '7'" in str(here.value)
    assert mm.workers.num_alive == 2   # a refused prompt does not cost a worker


def test_a_killed_worker_loses_nothing(llm, images, caplog):
    workers = llm.llm_engine.multimodal.workers
    victim = workers._workers[0]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=30)
    prompts = [_prompt(images, i) for i in range(llm_module.MIN_PROMPTS_FOR_THREADS + 2)]
    with caplog.at_level(logging.WARNING, logger=workers_module.__name__):
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    want = _in_this_process(llm, lambda: [o.outputs[0].token_ids for o in llm.generate(
        prompts, GREEDY, use_tqdm=False)])
    assert got == want
    assert workers.num_alive == 1
    assert [r.message for r in caplog.records if "nothing is lost" in r.message]


def test_close_stops_the_workers(llm, images):
    mm = llm.llm_engine.multimodal
    procs = [w.proc for w in mm.workers._workers]
    mm.close()
    assert all(p.poll() is not None for p in procs)
    assert mm.process(_prompt(images), "0").token_ids    # preprocessed here now


def test_number_of_workers(monkeypatch):
    monkeypatch.setenv(workers_module.ENV_WORKERS, "3")
    assert workers_module.default_num_workers() == 3
    monkeypatch.setenv(workers_module.ENV_WORKERS, "many")
    with pytest.raises(ValueError, match="number of worker processes"):
        workers_module.default_num_workers()
    monkeypatch.delenv(workers_module.ENV_WORKERS)
    for cores, want in ((2, 0), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(workers_module.os, "sched_getaffinity",
                            lambda pid, n=cores: set(range(n)))
        assert workers_module.default_num_workers() == want


def test_a_processor_that_does_not_pickle_stays_in_this_process(caplog):
    import threading
    with caplog.at_level(logging.WARNING, logger=workers_module.__name__):
        assert workers_module.start_workers(threading.Lock(), 2) is None
    assert "cannot be sent to worker processes" in caplog.text


def test_closing_while_workers_start_is_quiet(caplog):
    """close() (or the interpreter's exit) while a worker still starts ends that start with
    EOF: no warning about a worker that 'exited'."""
    with caplog.at_level(logging.WARNING, logger=workers_module.__name__):
        workers = workers_module.start_workers({"a plain": "object"}, 1)
        workers.close()
        assert workers.wait_started(START_S)
    assert workers.num_alive == 0
    assert not caplog.records


def test_workers_exit_when_their_process_is_killed(tmp_path):
    """kill -9 of the process that started them closes their stdin: they exit, no orphans."""
    import subprocess
    import sys
    import time
    script = ("import sys, time\n"
              "from hpcinfer.multimodal.workers import start_workers\n"
              "w = start_workers({'a plain': 'object'}, 2)\n"
              "assert w.wait_started(60)\n"
              "print(' '.join(str(x.proc.pid) for x in w._workers), flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.kill()
    parent.wait(timeout=30)

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"   # a zombie has exited
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_frames_carry_arrays_out_of_band_through_a_pipe():
    """Arrays travel after the pickle and are unpickled on the bytes read, not copied again;
    a frame bigger than the pipe's buffer (64 KiB) arrives whole, as does one without any."""
    import numpy as np

    from hpcinfer.multimodal.workers import _from_wire, _to_wire, read_frame, write_frame
    pixels = torch.randn(1024, 1176).to(torch.bfloat16)
    message = ("ok", (_to_wire({"pixel_values": pixels, "grid": torch.tensor([[1, 32, 32]]),
                                "n": 3}, None), [7, 8]))
    rx, tx = os.pipe()
    with os.fdopen(rx, "rb") as reader, os.fdopen(tx, "wb") as writer:
        sender = threading.Thread(target=lambda: (write_frame(writer, message),
                                                  write_frame(writer, ("ready", None))))
        sender.start()
        status, (wire, hashes) = read_frame(reader)
        assert read_frame(reader) == ("ready", None)
        sender.join()
    bits = wire["pixel_values"][1]
    # the pixels are not in the pickle: read into their own buffer, unpickled without a copy
    stream = io.BytesIO()
    write_frame(stream, message)
    pickle_size, num_buffers = struct.unpack("<2Q", stream.getvalue()[:16])
    assert pickle_size < 4096 and num_buffers == 2
    out = _from_wire(wire)
    assert torch.equal(out["pixel_values"], pixels) and out["n"] == 3
    assert torch.equal(out["grid"], torch.tensor([[1, 32, 32]])) and hashes == [7, 8]
    assert np.shares_memory(out["pixel_values"].view(torch.int16).numpy(), bits)


def test_replies_come_through_a_wide_pipe():
    """The pipe a worker replies through holds a whole image's pixels in a few reads."""
    import fcntl
    rx, tx = os.pipe()
    try:
        workers_module._widen_pipe(rx)
        assert fcntl.fcntl(rx, fcntl.F_GETPIPE_SZ) >= workers_module.PIPE_BYTES
    finally:
        os.close(rx)
        os.close(tx)
