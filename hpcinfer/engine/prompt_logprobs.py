"""Prompt logprobs (``SamplingParams(prompt_logprobs=k)``), as vLLM returns them.

``RequestOutput.prompt_logprobs`` is ``[None, {token: Logprob}, ...]``: None for the first
prompt token (nothing predicts it), then for prompt token i the log-softmax of the raw logits
at position i - 1, holding the actual token (with its true rank) and the k most likely tokens
(ranks 1..k). k = 0 gives the actual token only; -1 the whole vocabulary.

How it is computed, and why it costs nothing to requests that do not ask:

- Only prefill positions are read. The runner normally computes logits for each sequence's
  last position only; a step that holds prompt positions still owing an entry adds those rows
  (``plan_rows``, in ``ModelRunner.prepare``). A step without such rows is unchanged.
- Their logits are reduced on the device, a chunk of rows at a time (``reduce_rows``): each
  row keeps only the actual token's logprob and rank and the top-k, so a long prompt never
  holds [prompt_len, vocab] logits at once. Under pipeline parallelism the last stage reduces
  and sends the small result to rank 0.
- Entries are appended once per prompt token (``record``), so chunked prefill fills them over
  several steps and a preempted sequence that recomputes its prompt does not repeat them.
- Prefix-cache hits: a sequence still owing entries takes no cached block beyond the
  positions it has entries for (``Sequence.max_prefix_hit_tokens``): like vLLM v1, a request
  asking for prompt logprobs computes its whole prompt, and a cached prefix never drops them.
  Its blocks are still cached for later requests, and its other ``n > 1`` sequences share
  them as usual.
- Only the request's first sequence collects them (all ``n`` share the prompt).
- With tensor/pipeline parallelism rank 0 turns the result into entries and broadcasts them,
  so every rank returns the same outputs (as the sampler does for sampled tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcinfer.engine.outputs import Logprob
from hpcinfer.engine.sequence import Sequence

# Rows of logits reduced at once: bounds the [rows, vocab] float32 temporary (64 MiB at a
# 128k vocabulary).
ROWS_PER_CHUNK = 128


@dataclass
class PromptRows:
    """The rows of one step's hidden states whose logits give prompt logprobs.

    ``seqs[j]`` owns the next ``counts[j]`` rows, which give its entries from prompt token
    ``len(seqs[j].prompt_logprobs)`` on. ``result`` is written by the runner (on rank 0 and
    the last pipeline stage): [num_rows, 2 + 2 * num_top] float32 holding per row the actual
    token's logprob, its rank, the top logprobs, then the top token ids (exact in float32
    below 2**24)."""

    indices: torch.Tensor      # [num_rows] rows of the step's hidden states
    target_ids: torch.Tensor   # [num_rows] the prompt token each row predicts
    seqs: list[Sequence]
    counts: list[int]
    num_top: int
    result: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def result_width(self) -> int:
        return 2 + 2 * self.num_top


def plan_rows(seqs: list[Sequence], starts: np.ndarray, num_new_tokens: list[int],
              cu_seqlens: np.ndarray, device: torch.device) -> PromptRows | None:
    """The step's prompt-logprob rows, or None (the common case, one cheap scan)."""
    owners = [i for i, s in enumerate(seqs) if s.prompt_logprobs is not None]
    if not owners:
        return None
    rows, targets, row_seqs, counts = [], [], [], []
    for i in owners:
        seq = seqs[i]
        first = len(seq.prompt_logprobs) - 1  # position whose logits give the next entry
        start = int(starts[i])
        end = min(start + num_new_tokens[i], seq.num_prompt_tokens - 1)
        assert start <= first or not seq.needs_prompt_logprobs, "prompt logprobs skipped"
        if end <= first:
            continue
        rows.append(np.arange(first, end) - start + int(cu_seqlens[i]))
        targets.extend(seq.token_ids[first + 1:end + 1])
        row_seqs.append(seq)
        counts.append(end - first)
    if not row_seqs:
        return None
    num_top = max(s.params.prompt_logprobs for s in row_seqs)
    return PromptRows(torch.from_numpy(np.concatenate(rows)).to(device),
                      torch.tensor(targets, dtype=torch.int64, device=device),
                      row_seqs, counts, num_top)


def reduce_rows(compute_logits, hidden: torch.Tensor, rows: PromptRows) -> torch.Tensor:
    """[num_rows, result_width] float32 (see PromptRows.result), chunk by chunk.

    compute_logits: the model's head (a collective under tensor parallelism: every rank of
    the stage calls it with the same rows)."""
    parts = []
    for a in range(0, rows.num_rows, ROWS_PER_CHUNK):
        index = rows.indices[a:a + ROWS_PER_CHUNK]
        logprobs = torch.log_softmax(compute_logits(hidden[index]).float(), dim=-1)
        target = rows.target_ids[a:a + ROWS_PER_CHUNK, None]
        target_lp = logprobs.gather(1, target)                         # [rows, 1]
        rank = (logprobs > target_lp).sum(dim=-1, keepdim=True) + 1    # 1 = most likely
        top_lp, top_ids = logprobs.topk(rows.num_top, dim=-1)
        parts.append(torch.cat([target_lp, rank.float(), top_lp, top_ids.float()], dim=1))
    return torch.cat(parts)


def entries(rows: PromptRows) -> list[list[dict[int, Logprob]]]:
    """Per owning sequence, its new entries (decoded_token still unset): the actual token
    first with its true rank, then the top-k by rank (vLLM's order)."""
    table = rows.result.cpu().tolist()
    width = rows.num_top
    out, r = [], 0
    targets = rows.target_ids.tolist()
    for seq, count in zip(rows.seqs, rows.counts):
        k = seq.params.prompt_logprobs
        seq_entries = []
        for line, target in zip(table[r:r + count], targets[r:r + count]):
            entry = {target: Logprob(line[0], int(line[1]))}
            for j in range(k):
                entry.setdefault(int(line[2 + width + j]), Logprob(line[2 + j], j + 1))
            seq_entries.append(entry)
        out.append(seq_entries)
        r += count
    return out


def record(rows: PromptRows, tokenizer, parallel=None) -> None:
    """Append the step's entries to their sequences. With several ranks, rank 0 (which holds
    the result) builds them and every rank appends the same."""
    if parallel is None:
        new = entries(rows)
    else:
        import torch.distributed as dist
        world = parallel.groups.world
        box = [entries(rows) if world.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=world.cpu_group)
        new = box[0]
    for seq, seq_entries in zip(rows.seqs, new):
        if seq.params.detokenize:
            for entry in seq_entries:
                for token_id, logprob in entry.items():
                    logprob.decoded_token = tokenizer.decode([token_id])
        seq.prompt_logprobs.extend(seq_entries)
