"""ShardLoop with a fake engine (no model): bounded in-flight rows, the stop flag (abort,
commit, "stopped", then a restart finishes exactly once), on_bad_row: fail, and the request
builder's sampling merge."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from hpcinfer.compile.plan import Shard
from hpcinfer.io import ledger
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import InputRow, InputSpec
from hpcinfer.io.shard_loop import BadRowError
from hpcinfer.testing.worker_jobs import finished_output
from hpcinfer.worker.loop import LoopOptions, ShardLoop
from hpcinfer.worker.progress import Progress
from hpcinfer.worker.requests import RequestBuilder, base_sampling
from hpcinfer.worker.signals import StopFlag


class FakeTokenizer:
    @dataclass
    class Encoded:
        input_ids: list

    def __call__(self, text):
        return self.Encoded([1 + ord(c) % 50 for c in text])


@dataclass
class FakeEngine:
    """Finishes the two oldest requests per step; records the most ever in flight."""
    stop: StopFlag | None = None
    stop_at_step: int | None = None
    requests: dict = field(default_factory=dict)
    aborted: list = field(default_factory=list)
    max_in_flight: int = 0
    num_steps: int = 0

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.requests[request_id] = prompt["prompt_token_ids"]
        self.max_in_flight = max(self.max_in_flight, len(self.requests))

    def step(self, final_only=False):
        self.num_steps += 1
        if self.stop is not None and self.num_steps == self.stop_at_step:
            self.stop.signal_name = "SIGUSR2"
        outs = []
        for rid in list(self.requests)[:2]:
            ids = self.requests.pop(rid)
            outs.append(finished_output(rid, ids, f"answer {rid}", ids[:3]))
        return outs

    def abort_request(self, ids):
        self.aborted += ids
        for rid in ids:
            self.requests.pop(rid, None)

    def get_num_unfinished_requests(self):
        return len(self.requests)


def _input(tmp_path, num_rows, bad_at=()):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) if i not in bad_at
             else '{"id": "broken"' for i in range(num_rows)]
    path.write_text("\n".join(lines) + "\n")
    return Shard(index=0, file=str(path), start=0, stop=num_rows)


def _loop(tmp_path, shard, engine, stop, **options):
    builder = RequestBuilder(FakeTokenizer(), {"temperature": 0.0, "max_tokens": 4}, 64)
    return ShardLoop(engine, shard, InputSpec(), tmp_path / "shard", make_format("jsonl"),
                     builder, stop, Progress(shard.num_rows, 0, None, use_bar=False),
                     LoopOptions(**{"commit_every_rows": 4, **options}))


def _committed(tmp_path):
    return sorted(ledger.recover(tmp_path / "shard").done_indices)


def test_in_flight_rows_are_bounded_and_every_row_answered_once(tmp_path):
    shard = _input(tmp_path, 50, bad_at=(7, 30))
    engine = FakeEngine()
    assert _loop(tmp_path, shard, engine, StopFlag(), max_in_flight=3).run() == "done"
    assert engine.max_in_flight == 3
    assert _committed(tmp_path) == list(range(50))
    assert json.loads((tmp_path / "shard" / "DONE").read_text()) == \
        {"num_rows": 50, "num_results": 48, "num_errors": 2}
    assert _loop(tmp_path, shard, FakeEngine(), StopFlag()).run() == "already_done"


def test_stop_flag_aborts_in_flight_commits_and_restart_finishes(tmp_path):
    shard = _input(tmp_path, 40)
    stop = StopFlag()
    engine = FakeEngine(stop=stop, stop_at_step=5)
    assert _loop(tmp_path, shard, engine, stop, max_in_flight=6).run() == "stopped"
    done = _committed(tmp_path)
    assert len(done) == 10                       # 5 steps x 2 rows, all committed at once
    assert engine.aborted and not set(engine.aborted) & {f"0:{i}" for i in done}
    assert not (tmp_path / "shard" / "DONE").exists()
    assert _loop(tmp_path, shard, FakeEngine(), StopFlag()).run() == "done"
    assert _committed(tmp_path) == list(range(40))


def test_on_bad_row_fail_commits_what_finished_then_raises(tmp_path):
    shard = _input(tmp_path, 20, bad_at=(9,))
    engine = FakeEngine()
    with pytest.raises(BadRowError, match="row 9: line is not valid JSON"):
        _loop(tmp_path, shard, engine, StopFlag(), max_in_flight=2, on_bad_row="fail").run()
    done = _committed(tmp_path)
    assert done and max(done) < 9 and not engine.requests


def test_sampling_overrides_merge_over_the_job_and_bad_ones_are_bad_rows():
    from hpcinfer.config.schema import SamplingSection
    base = base_sampling(SamplingSection(temperature=0.7, max_tokens=9, stop=["\n"]))
    builder = RequestBuilder(FakeTokenizer(), base, 16, want_logprobs=True)
    row = InputRow(0, "f", "a", "a", prompt="hi", sampling={"max_tokens": 3, "seed": 5})
    request = builder.build(row)
    p = request.params
    assert (p.temperature, p.max_tokens, p.seed, p.stop_strings, p.logprobs) == \
        (0.7, 3, 5, ("\n",), 0)
    bad = builder.build(InputRow(1, "f", "b", "b", prompt="hi", sampling={"n": 2}))
    assert bad.kind == "invalid_sampling" and "n: 1" in bad.reason
    long = builder.build(InputRow(2, "f", "c", "c", prompt="x" * 40))
    assert long.kind == "prompt_too_long" and "40 tokens" in long.reason


def test_progress_line_bar_and_metrics(tmp_path, caplog):
    from hpcinfer.worker.metrics import MetricsWriter
    metrics = MetricsWriter(tmp_path, 3, 0, base={"task": 3})
    progress = Progress(100, 20, metrics, every_s=0.0, use_bar=False)
    progress.add_rows(30, num_errors=2)
    with caplog.at_level("INFO", logger="hpcinfer.worker"):
        progress.tick()
    assert "progress: rows 50/100 (2 bad)" in caplog.text and "ETA" in caplog.text
    [line] = (tmp_path / "metrics" / "task-00003-rank-000.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["task"], record["rows_done"], record["rows_total"], record["status"]) == \
        (3, 50, 100, "running")
    assert record["rows_per_s"] > 0 and record["eta_s"] is not None
    bar = Progress(10, 0, None, use_bar=True)      # the terminal path draws a rich bar
    bar.add_rows(10)
    bar.tick(force=True)
    bar.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_a_large_shard(tmp_path):
    """200k rows through the loop (fake engine): RSS grows by far less than the input."""
    path = tmp_path / "in.jsonl"
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(f'{{"id": "r{i}", "prompt": "prompt number {i} with some words"}}\n')
    shard = Shard(index=0, file=str(path), start=0, stop=200_000)
    engine = FakeEngine()
    engine.step = lambda final_only=False: [
        finished_output(rid, ids, "ok", ids[:2]) for rid, ids in
        [(rid, engine.requests.pop(rid)) for rid in list(engine.requests)]]
    before = _rss_bytes()
    loop = _loop(tmp_path, shard, engine, StopFlag(), max_in_flight=512,
                 commit_every_rows=20_000)
    assert loop.run() == "done"
    growth_mb = (_rss_bytes() - before) / 2**20
    print(f"RSS growth over 200k rows: {growth_mb:.1f} MB (input {path.stat().st_size / 2**20:.0f} MB)")
    assert engine.max_in_flight == 512
    assert growth_mb < 100
