"""ShardLoop with images and a fake engine: images are decoded (PIL) and processed (the
request built) in the reader thread, the loop steps while the reader is behind, a stop
mid-shard closes the reader and a restart answers every row once without processing the done
rows again (no model; the real one is tests/multimodal/test_image_jobs.py)."""
from __future__ import annotations

import io
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hpcinfer.compile.plan import Shard
from hpcinfer.io import ledger
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import InputSpec
from hpcinfer.multimodal import media
from hpcinfer.multimodal.inputs import ProcessedPrompt
from hpcinfer.testing.worker_jobs import finished_output
from hpcinfer.worker.loop import LoopOptions, ShardLoop
from hpcinfer.worker.progress import Progress
from hpcinfer.worker.requests import RequestBuilder
from hpcinfer.worker.signals import StopFlag


class FakeProcessor:
    placeholder = "<image>"

    def __init__(self):
        self.threads, self.sizes = set(), []

    def process(self, prompt, where):
        self.threads.add(threading.current_thread().name)
        self.sizes.append([im.size for im in prompt["multi_modal_data"]["image"]])
        return ProcessedPrompt(prompt["prompt"], [1, 2, 3])


class Engine:
    """Answers the oldest request per step; sets the stop flag at ``stop_at_step``."""

    def __init__(self, stop=None, stop_at_step=None):
        self.stop, self.stop_at_step, self.num_steps = stop, stop_at_step, 0
        self.requests: dict = {}
        self.loop, self.held = None, []

    def add_request(self, request_id, prompt, params, lora_request=None):
        assert isinstance(prompt, ProcessedPrompt)
        self.requests[request_id] = prompt.token_ids

    def step(self, final_only=False):
        self.num_steps += 1
        if self.loop is not None:  # what the loop holds for its in-flight rows
            self.held.extend(row for row, _ in self.loop.in_flight.values())
        if self.stop is not None and self.num_steps == self.stop_at_step:
            self.stop.signal_name = "SIGUSR2"
        rid = next(iter(self.requests))
        ids = self.requests.pop(rid)
        return [finished_output(rid, ids, f"answer {rid}", ids)]

    def abort_request(self, ids):
        for rid in ids:
            self.requests.pop(rid, None)


def _shard(tmp_path, num_rows, numbered=False):
    def png(w, h):
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), (w, h, 0)).save(buffer, format="PNG")
        return buffer.getvalue()
    rows = [{"id": f"r{i}", "prompt": "<image> what?" + (f" {i}" if numbered else ""),
             "image": png(8 + i, 9)}
            for i in range(num_rows)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    return Shard(index=0, file=str(path), start=0, stop=num_rows)


def _loop(tmp_path, shard, engine, stop, processor, max_in_flight=2):
    builder = RequestBuilder(None, {"temperature": 0.0, "max_tokens": 4}, 64,
                             multimodal=processor)
    spec = InputSpec(image_field="image")
    return ShardLoop(engine, shard, spec, tmp_path / "shard", make_format("jsonl"), builder,
                     stop, Progress(shard.num_rows, 0, None, use_bar=False),
                     LoopOptions(commit_every_rows=3, max_in_flight=max_in_flight))


def test_images_decode_and_process_in_the_reader_thread_and_a_stop_then_restart_is_exact(
        tmp_path, monkeypatch):
    decoded_in = set()
    real_open = media.open_image_bytes

    def recording_open(data, where, what):
        decoded_in.add(threading.current_thread().name)
        return real_open(data, where, what)

    monkeypatch.setattr(media, "open_image_bytes", recording_open)
    shard = _shard(tmp_path, 20)
    stop, processor = StopFlag(), FakeProcessor()
    assert _loop(tmp_path, shard, Engine(stop, stop_at_step=7), stop, processor).run() \
        == "stopped"
    assert decoded_in == {"row-reader"}
    assert processor.threads == {"row-reader"}
    assert not any(t.name == "row-reader" for t in threading.enumerate())   # closed
    done = sorted(ledger.recover(tmp_path / "shard").done_indices)
    assert done == list(range(7))
    processor = FakeProcessor()
    assert _loop(tmp_path, shard, Engine(), StopFlag(), processor).run() == "done"
    assert sorted(ledger.recover(tmp_path / "shard").done_indices) == list(range(20))
    assert processor.sizes == [[(8 + i, 9)] for i in range(7, 20)]


def test_in_flight_rows_drop_their_decoded_images(tmp_path):
    """The engine's request holds the processed images; the row kept for the writer holds
    none, so max_in_flight rows do not keep a second, decoded copy."""
    shard, engine = _shard(tmp_path, 6), Engine()
    loop = _loop(tmp_path, shard, engine, StopFlag(), FakeProcessor())
    engine.loop = loop
    assert loop.run() == "done"
    assert len(engine.held) >= 6 and all(row.images == () for row in engine.held)
    assert sorted(ledger.recover(tmp_path / "shard").done_indices) == list(range(6))


class SlowProcessor(FakeProcessor):
    """Row 3 waits until the engine has stepped: the loop must step rows 0-2 meanwhile
    instead of waiting for the reader to fill max_in_flight."""

    def __init__(self, engine):
        super().__init__()
        self.engine, self.stepped_before_row_3 = engine, None

    def process(self, prompt, where):
        if prompt["prompt"] == "<image> what? 3":
            deadline = time.monotonic() + 30
            while self.engine.num_steps == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.stepped_before_row_3 = self.engine.num_steps > 0
        return super().process(prompt, where)


def test_the_loop_steps_while_the_reader_is_behind(tmp_path):
    shard = _shard(tmp_path, 8, numbered=True)
    engine = Engine()
    processor = SlowProcessor(engine)
    loop = _loop(tmp_path, shard, engine, StopFlag(), processor, max_in_flight=8)
    assert loop.run() == "done"
    assert processor.stepped_before_row_3 is True
    assert sorted(ledger.recover(tmp_path / "shard").done_indices) == list(range(8))
