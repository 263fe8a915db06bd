"""The scheduler runs at most max_loras distinct adapters at once (others wait, in order),
and the prefix-cache chain is seeded by the adapter id."""
from __future__ import annotations

from hpcinfer.engine.block_manager import BlockManager
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.scheduler import Scheduler
from hpcinfer.engine.sequence import Sequence


def seq(i, lora_id, length=4):
    s = Sequence(str(i), 0, list(range(10, 10 + length)), SamplingParams(max_tokens=4), i)
    s.lora_id = lora_id
    return s


def scheduler(max_loras=2, max_num_seqs=8):
    bm = BlockManager(64, 4, max_num_seqs, 8)
    return Scheduler(bm, max_num_seqs, 1024, max_loras)


def test_admits_at_most_max_loras_adapters_and_keeps_the_others_in_order():
    sched = scheduler()
    seqs = [seq(0, 1), seq(1, 2), seq(2, 3), seq(3, 0), seq(4, 1), seq(5, 3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["0", "1", "3", "4"]   # adapter 3 waits
    assert [s.request_id for s in sched.waiting] == ["2", "5"]
    sched.finish([seqs[1]])                      # adapter 2's only sequence leaves
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} >= {"2", "5"}
    assert set(sched.adapters.counts) == {1, 3}


def test_preempted_and_finished_sequences_release_their_adapter():
    sched = scheduler(max_loras=1)
    a, b = seq(0, 1), seq(1, 2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.running == [a] and list(sched.waiting) == [b]
    sched._preempt(sched.running.pop())
    assert not sched.adapters.counts
    sched.finish([a])
    out = sched.schedule()
    assert out.seqs == [b] and dict(sched.adapters.counts) == {2: 1}


def test_block_hashes_differ_per_adapter():
    bm = BlockManager(64, 4, 8, 8)
    hashes = {}
    for lora_id in (0, 1, 2):
        s = seq(lora_id, lora_id, length=9)
        bm._extend_hashes(s, 2)
        hashes[lora_id] = tuple(s.block_hashes)
    assert len({h[0] for h in hashes.values()}) == 3
    assert len({h[1] for h in hashes.values()}) == 3
