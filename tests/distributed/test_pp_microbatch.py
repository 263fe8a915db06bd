"""Pipeline micro-batching: the cut, the metadata of each micro-batch, tokens equal to one
process under a real mpirun (PP=2 and TP=2 x PP=2, preemption and prefix caching on), the
degenerate cut (more micro-batches asked than sequences), and an order fact showing that
stages overlap (stage 1 starts micro-batch 0 before stage 0 runs its last one)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcinfer.distributed.pipeline import (
    MIN_MICRO_BATCH_TOKENS,
    micro_batch_bounds,
    micro_batches_setting,
    num_micro_batches,
)
from hpcinfer.testing.require import require
from hpcinfer.testing.tiny import TINY_FAMILIES

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
MPIRUN = shutil.which("mpirun")


# --- the cut (pure) ----------------------------------------------------------------------

@pytest.mark.parametrize("q_lens, num_micro", [
    ([1] * 8, 3), ([100, 1, 1, 1], 2), ([1, 1, 100], 2), ([5, 5], 8), ([3], 4),
    ([1, 1, 1, 1, 50, 50], 3), ([7, 300, 2, 2, 2, 90, 1], 4), ([1] * 5, 5)])
def test_bounds_are_contiguous_nonempty_and_cover_every_sequence(q_lens, num_micro):
    bounds = micro_batch_bounds(q_lens, num_micro)
    assert len(bounds) == min(num_micro, len(q_lens))
    assert bounds[0][0] == 0 and bounds[-1][1] == len(q_lens)
    assert all(a < b for a, b in bounds)
    assert all(b == a2 for (_, b), (a2, _) in itertools.pairwise(bounds))


def test_bounds_balance_tokens():
    # 8 decodes and one 64-token prefill: the prefill gets a micro-batch of its own
    assert micro_batch_bounds([1] * 8 + [64], 2) == [(0, 8), (8, 9)]
    assert micro_batch_bounds([10] * 6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_automatic_count_keeps_micro_batches_compute_sized():
    big = MIN_MICRO_BATCH_TOKENS
    assert num_micro_batches(None, 1, 64, 100 * big) == 1        # no pipeline
    assert num_micro_batches(None, 2, 64, big - 1) == 1          # too small to cut
    assert num_micro_batches(None, 2, 64, 2 * big) == 2          # one per stage
    assert num_micro_batches(None, 4, 64, 3 * big) == 3
    assert num_micro_batches(None, 4, 2, 100 * big) == 2         # never more than sequences
    assert num_micro_batches(5, 2, 64, 8) == 5                   # asked for: as asked
    assert num_micro_batches(16, 2, 6, 6) == 6                   # ... up to the sequences


def test_setting_from_argument_or_environment():
    assert micro_batches_setting(3, {"HPCINFER_PP_MICRO_BATCHES": "7"}) == 3
    assert micro_batches_setting(None, {"HPCINFER_PP_MICRO_BATCHES": "7"}) == 7
    assert micro_batches_setting(None, {"HPCINFER_PP_MICRO_BATCHES": "auto"}) is None
    assert micro_batches_setting(None, {}) is None
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="HPCINFER_PP_MICRO_BATCHES.*integer >= 1"):
            micro_batches_setting(None, {"HPCINFER_PP_MICRO_BATCHES": bad})


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_engine_argument_says_what_is_allowed(bad):
    from hpcinfer.engine.config import EngineConfig
    with pytest.raises(ValueError, match="pipeline_micro_batches.*integer >= 1"):
        EngineConfig.from_kwargs("model", pipeline_micro_batches=bad)


# --- each micro-batch's metadata: forwarding the parts equals forwarding the whole -------

def test_micro_batches_forward_to_the_whole_batch_rows():
    from hpcinfer import SamplingParams
    from hpcinfer.engine.config import EngineConfig
    from hpcinfer.engine.distributed_runner import split_batch
    from hpcinfer.engine.llm_engine import LLMEngine
    from hpcinfer.testing.tiny import tiny_checkpoint
    # (no step left in flight: this test schedules and prepares a step by hand)
    sync = ({"async_scheduling": False} if "async_scheduling" in
            {f.name for f in dataclasses.fields(EngineConfig)} else {})
    engine = LLMEngine(EngineConfig.from_kwargs(
        str(tiny_checkpoint("llama3")), dtype="float32", device="cpu", block_size=4,
        max_model_len=128, attention_backend="torch_ref", **sync))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, n in enumerate((5, 17, 9)):
        engine.add_request(f"a{i}", torch.randint(5, 200, (n,), generator=g).tolist(), params)
    engine.step()                        # prefills: the next step decodes these three ...
    for i, n in enumerate((23, 2)):      # ... next to two new prefills (a mixed step)
        engine.add_request(f"b{i}", torch.randint(5, 200, (n,), generator=g).tolist(), params)
    scheduled = engine.scheduler.schedule()
    seqs, q_lens = scheduled.seqs, scheduled.num_new_tokens
    assert q_lens[:3] == [1, 1, 1] and len(q_lens) == 5
    runner, model = engine.runner, engine.runner.model
    batch = runner.prepare(seqs, q_lens, engine.block_manager)
    seq_lens = [s.num_computed_tokens + q for s, q in zip(seqs, q_lens)]
    done = [n == len(s.token_ids) for s, n in zip(seqs, seq_lens)]
    with torch.inference_mode():
        whole = model.forward(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
        want = model.compute_logits(whole[batch.sample_indices])
        for bounds in ([(0, 2), (2, 3), (3, 5)], [(0, 4), (4, 5)], [(i, i + 1) for i in range(5)]):
            micro = split_batch(batch, bounds, q_lens, seq_lens, done)
            assert [s for mb in micro for s in mb.sample_seqs] == batch.sample_seqs
            assert micro[0].meta.is_decode == (bounds[0][1] <= 3)
            # writing the same keys/values again is harmless: each part sees what the whole saw
            parts = [model.forward(mb.input_ids, mb.positions, runner.kv_caches, mb.meta)
                     for mb in micro]
            torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
            logits = torch.cat([model.compute_logits(p[mb.sample_indices])
                                for p, mb in zip(parts, micro)])
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


# --- real ranks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp-refs") / "refs.json"
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.testing.distributed", "reference",
                           str(path), *TINY_FAMILIES], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def _read_trace(trace_dir: Path, rank: int) -> list[dict]:
    lines = (trace_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("ranks, layout, families, num_micro", [
    (2, "1:2", TINY_FAMILIES, 3),
    (4, "2:2", ("llama3", "gemma", "opt"), 2)], ids=["pp2-m3", "tp2xpp2-m2"])
def test_micro_batched_tokens_equal_single_process(references, tmp_path, ranks, layout,
                                                   families, num_micro):
    require(MPIRUN is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    cases = [f"{family}:{layout}" for family in families]
    verdict_path, trace_dir = tmp_path / "verdict.json", tmp_path / "trace"
    env = {**ENV, "HPCINFER_PP_MICRO_BATCHES": str(num_micro),
           "HPCINFER_PP_TRACE": str(trace_dir)}
    proc = subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
                           sys.executable, "-m", "hpcinfer.testing.distributed", "check",
                           str(references), str(verdict_path), *cases],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"mpirun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    verdict = json.loads(verdict_path.read_text())
    failed = {case: v["first_mismatch"] for case, v in verdict.items() if not v["ok"]}
    assert sorted(verdict) == sorted(cases) and not failed, failed
    for case, v in verdict.items():
        assert v["preemptions"] > 0 and v["prefix_hits"] > 0, (case, v)
    # the steps really were cut: the last stage ran micro-batch num_micro - 1
    last_stage = _read_trace(trace_dir, ranks - 1)
    assert max(e["micro"] for e in last_stage) == num_micro - 1


def test_stages_overlap_and_more_micro_batches_than_sequences(tmp_path):
    # One process asks for PP=2 (spawned rank) and 16 micro-batches for at most 6 sequences:
    # every step is cut into one micro-batch per sequence, tokens stay those of one process.
    trace_dir = tmp_path / "trace"
    code = (
        "import json, sys\n"
        "from hpcinfer.testing.distributed import generate\n"
        "from hpcinfer.testing.tiny import build_tiny_checkpoint\n"
        f"path = str(build_tiny_checkpoint('qwen3', {str(tmp_path / 'ckpt')!r}))\n"
        "ref, _ = generate(path)\n"
        "got, stats = generate(path, pipeline_parallel_size=2, pipeline_micro_batches=16)\n"
        "print('RESULT ' + json.dumps({'ref': ref, 'got': got, **stats}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**ENV, "HPCINFER_PP_TRACE": str(trace_dir)}, timeout=240, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][7:])
    assert result["got"] == result["ref"]
    assert result["preemptions"] > 0 and result["prefix_hits"] > 0
    stage0, stage1 = _read_trace(trace_dir, 0), _read_trace(trace_dir, 1)
    steps = {}
    for e in stage0:
        steps.setdefault(e["step"], []).append(e)
    num_micro = {step: 1 + max(e["micro"] for e in events) for step, events in steps.items()}
    # one micro-batch per running sequence: the 24-block pool holds at most 3 at a time
    assert 3 <= max(num_micro.values()) <= 6, num_micro
    started_0 = {e["step"] for e in stage1 if e["event"] == "start" and e["micro"] == 0}
    overlapped = 0
    for step, events in steps.items():
        if num_micro[step] < 2:
            continue
        order = [(e["event"], e["micro"]) for e in events]
        # stage 0 learnt that stage 1 had started micro-batch 0 of this step *before* stage 0
        # started (let alone ended) its last micro-batch
        last = num_micro[step] - 1
        assert order.index(("next_started_0", last)) < order.index(("start", last)) \
            < order.index(("end", last)), (step, order)
        assert step in started_0
        overlapped += 1
    assert overlapped >= 10, num_micro


def test_three_stages_with_a_middle_stage(tmp_path):
    # PP=3 over a 4-layer model (stages of 2, 1 and 1 layers): the middle stage receives
    # and sends on every micro-batch; tokens equal one process, and both stage pairs overlap.
    trace_dir = tmp_path / "trace"
    code = (
        "import json\n"
        "from hpcinfer.testing.distributed import generate\n"
        "from hpcinfer.testing.tiny import build_tiny_checkpoint\n"
        f"path = str(build_tiny_checkpoint('llama3', {str(tmp_path / 'ckpt')!r}, "
        "num_hidden_layers=4))\n"
        "ref, _ = generate(path)\n"
        "got, stats = generate(path, pipeline_parallel_size=3, pipeline_micro_batches=3)\n"
        "print('RESULT ' + json.dumps({'ref': ref, 'got': got, **stats}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**ENV, "HPCINFER_PP_TRACE": str(trace_dir)}, timeout=240,
                          check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][7:])
    assert result["got"] == result["ref"]
    assert result["preemptions"] > 0 and result["prefix_hits"] > 0
    for rank in (0, 1):  # each stage but the last saw its successor start before its last
        events = _read_trace(trace_dir, rank)
        assert any(e["event"] == "next_started_0" and e["micro"] == 2 for e in events), rank
    assert max(e["micro"] for e in _read_trace(trace_dir, 2)) == 2
