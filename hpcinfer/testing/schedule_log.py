"""What the scheduler scheduled, step by step, for tests of chunking (image spans, budgets)."""
from __future__ import annotations


def record_chunks(llm) -> list:
    """Wrap ``llm``'s scheduler; returns the list it fills with (sequence, first token,
    tokens) for every sequence of every step it schedules from now on."""
    scheduler, chunks = llm.llm_engine.scheduler, []
    schedule = scheduler.schedule

    def recorded():
        out = schedule()
        chunks.extend((seq, seq.num_computed_tokens, n)
                      for seq, n in zip(out.seqs, out.num_new_tokens))
        return out
    scheduler.schedule = recorded
    return chunks
