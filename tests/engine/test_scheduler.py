"""Scheduler: one token budget, chunked prefill, max_num_seqs, preemption by recompute.

Driven without a model: each "step" marks the scheduled tokens computed and appends a dummy
token to every sequence whose computed tokens caught up with its length.
"""
from __future__ import annotations

import random

from hpcinfer.engine.block_manager import BlockManager
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.scheduler import Scheduler
from hpcinfer.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=32, max_blocks_per_seq=16):
    bm = BlockManager(num_blocks, BS, max_num_seqs, max_blocks_per_seq)
    return bm, Scheduler(bm, max_num_seqs, budget)


def run_step(sched: Scheduler, max_new: int) -> list[tuple[Sequence, int]]:
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    sched.update_computed(out)
    done = []
    for seq, n in zip(out.seqs, out.num_new_tokens):
        assert seq.num_computed_tokens <= len(seq)
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(7)
            if seq.num_output_tokens >= max_new:
                done.append(seq)
    sched.finish(done)
    return list(zip(out.seqs, out.num_new_tokens))


def drain(sched, bm, seqs, max_new, max_steps=2000):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        run_step(sched, max_new)
        bm.check_invariants(list(sched.running) + list(sched.waiting))
    assert not sched.has_unfinished()
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == max_new for s in seqs)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


def test_chunked_prefill_respects_budget_and_mixes_decode():
    bm, sched = make(budget=8)
    long = Sequence("a", 0, list(range(30)), SamplingParams())
    sched.add(long)
    steps = [run_step(sched, 3) for _ in range(3)]
    assert [n for _, n in steps[0]] == [8] and long.num_computed_tokens == 24
    short = Sequence("b", 0, [1, 2], SamplingParams())
    sched.add(short)
    mixed = run_step(sched, 3)     # long finishes its prefill (6 left) and short gets 2
    assert [(s.request_id, n) for s, n in mixed] == [("a", 6), ("b", 2)]
    drain(sched, bm, [long, short], 3)


def test_max_num_seqs_caps_running():
    bm, sched = make(max_num_seqs=2, budget=100)
    seqs = [Sequence(str(i), 0, [i + 1] * 5, SamplingParams()) for i in range(5)]
    for s in seqs:
        sched.add(s)
    first = run_step(sched, 4)
    assert len(first) == 2 and len(sched.waiting) == 3
    drain(sched, bm, seqs, 4)


def test_preemption_by_recompute_when_blocks_run_out():
    # 6 blocks of 4 tokens; 3 sequences of 7 tokens growing to 15 cannot all fit.
    bm, sched = make(num_blocks=6, budget=64, max_blocks_per_seq=6)
    seqs = [Sequence(str(i), 0, [10 + i] * 7, SamplingParams()) for i in range(3)]
    for s in seqs:
        sched.add(s)
    drain(sched, bm, seqs, 8)
    assert sched.num_preemptions > 0
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    # The newest sequence is the victim; the oldest runs through untouched.
    assert seqs[0].num_preemptions == 0


def test_preempted_sequence_resumes_with_its_outputs():
    bm, sched = make(num_blocks=4, budget=64, max_blocks_per_seq=4)
    a = Sequence("a", 0, [1] * 6, SamplingParams())
    b = Sequence("b", 0, [2] * 6, SamplingParams())
    sched.add(a)
    sched.add(b)
    drain(sched, bm, [a, b], 9)
    assert b.num_preemptions >= 1
    assert b.token_ids == [2] * 6 + [7] * 9


def test_abort_from_waiting_and_running_frees_everything():
    bm, sched = make(max_num_seqs=1)
    a = Sequence("a", 0, [1] * 9, SamplingParams())
    b = Sequence("b", 0, [2] * 9, SamplingParams())
    sched.add(a)
    sched.add(b)
    run_step(sched, 100)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    sched.finish([a, b])
    assert not sched.has_unfinished()
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_hits_skip_computed_tokens():
    bm, sched = make(budget=100)
    shared = list(range(1, 13))                      # 3 full blocks
    a = Sequence("a", 0, shared + [50], SamplingParams())
    sched.add(a)
    run_step(sched, 5)
    b = Sequence("b", 0, shared + [60, 61], SamplingParams())
    sched.add(b)
    step = run_step(sched, 5)
    assert (b, 2) in step and b.num_cached_tokens == 12
    drain(sched, bm, [a, b], 5)
    assert bm.prefix_cache_hits == 12


def test_random_workload_invariants():
    rng = random.Random(0)
    bm, sched = make(num_blocks=20, max_num_seqs=4, budget=10, max_blocks_per_seq=10)
    seqs = []
    for i in range(12):
        tokens = [1, 2, 3, 4, 5, 6, 7, 8][:rng.randrange(9)] + [rng.randrange(30)
                                                                for _ in range(rng.randrange(1, 20))]
        seqs.append(Sequence(str(i), 0, tokens, SamplingParams()))
        sched.add(seqs[-1])
    drain(sched, bm, seqs, 12)
    assert sched.num_preemptions > 0 and bm.prefix_cache_hits > 0


def test_shared_prefix_is_computed_once_when_requests_arrive_together():
    """Rows sharing a long system prompt, all waiting at once: the first computes the prefix,
    the others wait a step for its blocks instead of each computing them (issue 22)."""
    bm, sched = make(num_blocks=256, max_num_seqs=8, budget=512, max_blocks_per_seq=32)
    shared = list(range(100, 132))                      # 8 blocks of 4
    seqs = [Sequence(str(i), 0, shared + [i, i + 1, i + 2], SamplingParams()) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    first = run_step(sched, 2)
    assert [(s.request_id, n) for s, n in first] == [("0", 35)]   # the others wait for it
    bm.check_invariants(list(sched.running) + list(sched.waiting))
    second = run_step(sched, 2)
    admitted = [(s.request_id, n) for s, n in second if s.request_id != "0"]
    assert admitted == [(str(i), 3) for i in range(1, 6)]         # the prefix came from cache
    assert bm.prefix_cache_hits == 5 * 32
    drain(sched, bm, seqs, 2)


def test_short_shared_prefix_does_not_hold_requests_back():
    from hpcinfer.engine.scheduler import MIN_PENDING_BLOCKS
    bm, sched = make(num_blocks=256, max_num_seqs=8, budget=512, max_blocks_per_seq=32)
    shared = list(range(100, 100 + BS * (MIN_PENDING_BLOCKS - 1)))
    seqs = [Sequence(str(i), 0, shared + [i, i + 1], SamplingParams()) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    assert [s.request_id for s, _ in run_step(sched, 2)] == ["0", "1", "2", "3"]
    drain(sched, bm, seqs, 2)


def test_waiting_for_a_prefix_ends_when_its_writer_is_preempted_or_finished():
    """The in-flight count of a sequence's blocks goes when it is freed, so a request never
    waits for blocks nobody computes any more."""
    bm, sched = make(num_blocks=256, max_num_seqs=8, budget=16, max_blocks_per_seq=32)
    shared = list(range(100, 132))
    writer = Sequence("w", 0, shared + [1], SamplingParams())
    reader = Sequence("r", 0, shared + [2], SamplingParams())
    sched.add(writer)
    sched.add(reader)
    assert [s.request_id for s, _ in run_step(sched, 2)] == ["w"]   # 16 of its 33 tokens
    assert bm.pending_prefix_blocks(reader, len(bm.find_cached_prefix(reader))) == 4
    sched.finish([writer])                                          # e.g. aborted
    assert bm.in_flight == {}
    bm.check_invariants(list(sched.running) + list(sched.waiting))
    step = run_step(sched, 2)
    assert [s.request_id for s, _ in step] == ["r"]
