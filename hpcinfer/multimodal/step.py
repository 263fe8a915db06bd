"""Images in a step: which rows of the flattened batch take image embeddings, and the
encoder runs that produce them.

Policy: an image is encoded in the first step whose scheduled tokens reach one of its
placeholder tokens, all such images of the step in one ``encode_images`` call; the scheduler
keeps their tokens within the step's encoder budget (engine/scheduler.py). The output is kept
on the request's MultiModalInputs and sliced per chunk, so chunked prefill may cut through a
placeholder span anywhere: each chunk takes rows [lo, hi) of the one encoder output. It is
dropped after the step that computes the image's last placeholder token. Placeholder tokens
that came from the prefix cache are never scheduled, so their images are not encoded at all.
A preempted sequence (recompute) or a second sample of an n > 1 request whose prefix missed
the cache encodes again.

Models whose image tokens attend to their whole span (``bidirectional_image_spans``, Gemma 3)
also get each query row's last visible key position (``span_last_keys``) into the step's
attention metadata; their chunks never end inside a span (engine/scheduler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcinfer.layers.transfer import to_device
from hpcinfer.multimodal.inputs import MultiModalInputs


@dataclass
class ImageRows:
    rows: np.ndarray                                  # [R] flat batch rows, in piece order
    pieces: list[tuple[MultiModalInputs, int, int, int]]  # (inputs, item, lo, hi) per slice


def plan_image_rows(seqs, starts: np.ndarray, q_lens: np.ndarray,
                    cu_seqlens: np.ndarray) -> ImageRows | None:
    """The batch rows holding image placeholders this step; None when there are none."""
    rows, pieces = [], []
    starts_l = starts.tolist()
    for i, seq in enumerate(seqs):
        mm = seq.mm_inputs
        if mm is None or starts_l[i] >= mm.images_end:   # past its images: every decode row
            continue
        start, end = starts_l[i], starts_l[i] + int(q_lens[i])
        for k, item in enumerate(mm.items):
            lo, hi = max(start, item.offset), min(end, item.end)
            if lo < hi:
                base = int(cu_seqlens[i]) - start
                rows.append(np.arange(base + lo, base + hi))
                pieces.append((mm, k, lo - item.offset, hi - item.offset))
    if not pieces:
        return None
    return ImageRows(np.concatenate(rows), pieces)


def span_last_keys(plan: ImageRows, positions: np.ndarray) -> np.ndarray:
    """[num_tokens] int32: the last key position each row's query may see; its own position,
    or for an image placeholder row its span's last position (positions are 1-D: token index
    = position). The scheduler keeps each span within one step, so those keys are there."""
    last = positions.astype(np.int32)
    ends = [mm.items[k].end - 1 for mm, k, _, _ in plan.pieces]
    last[plan.rows] = np.repeat(ends, [hi - lo for _, _, lo, hi in plan.pieces])
    return last


def image_embeds(plan: ImageRows, model, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [R] int64, embeddings [R, hidden]) for the step; encodes the images not cached."""
    missing, seen = [], set()
    for mm, k, _, _ in plan.pieces:
        if k not in mm.embeddings and (id(mm), k) not in seen:
            seen.add((id(mm), k))
            missing.append((mm, k))
    if missing:
        inputs = [{name: to_device(t, device) if t.is_floating_point() else t
                   for name, t in mm.items[k].inputs.items()} for mm, k in missing]
        for (mm, k), out in zip(missing, model.encode_images(inputs)):
            if out.shape[0] != mm.items[k].length:
                raise RuntimeError(f"the vision encoder gave {out.shape[0]} embeddings for an "
                                   f"image with {mm.items[k].length} placeholder tokens; this "
                                   "is a bug: please report it with the model")
            mm.embeddings[k] = out
    embeds = torch.cat([mm.embeddings[k][lo:hi] for mm, k, lo, hi in plan.pieces])
    for mm, k, _, hi in plan.pieces:   # after the slicing: two samples may share an image
        if hi == mm.items[k].length:
            mm.embeddings.pop(k, None)
    # (layers/transfer.py: a pageable copy would wait for the step in flight; the pixels were
    # pinned on the preprocessing thread, multimodal/pinned.py. Integer inputs, the image
    # grids, stay on the host: the encoders read them as Python ints, and reading a device
    # tensor would wait for the GPU the same way.)
    rows = to_device(plan.rows, device)
    return rows, embeds


def mrope_positions(seqs, starts: np.ndarray, q_lens: np.ndarray,
                    positions: np.ndarray) -> np.ndarray:
    """M-RoPE positions of a step: [3, T] when it holds image tokens, else [T].

    A prompt with images reads its table; tokens after it (and text-only sequences) take
    their position (+ the prompt's rope delta) on all three rows. Only image tokens have
    rows that differ, and with three equal rows M-RoPE is plain rope, so a step without
    image tokens (every decode step) gets one row: the shape the decode CUDA graphs and
    the mixed-step split take (engine/cuda_graphs.py)."""
    # One pass of attribute reads, no numpy call per row (a decode step of 500 image rows
    # took 2.2 ms with ~6 numpy calls a row, on the 2-core VM): the shift of the tokens past
    # each prompt, and the rows whose chunk still reads its prompt's table (prefill chunks).
    starts_l = starts.tolist()
    delta, table_rows = None, []
    for i, seq in enumerate(seqs):
        mm = seq.mm_inputs
        if mm is None or mm.rope_positions is None:
            continue
        if mm.rope_delta:
            if delta is None:
                delta = np.zeros(len(seqs), np.int64)
            delta[i] = mm.rope_delta
        if starts_l[i] < mm.rope_positions.shape[1]:
            table_rows.append(i)
    flat = positions if delta is None else positions + np.repeat(delta, q_lens)
    if not table_rows:
        return flat
    out = np.repeat(flat[None], 3, axis=0)
    row_starts = np.cumsum(q_lens) - q_lens
    uneven = False
    for i in table_rows:
        table = seqs[i].mm_inputs.rope_positions
        start, row = starts_l[i], int(row_starts[i])
        in_prompt = max(min(start + int(q_lens[i]), table.shape[1]) - start, 0)
        table = table[:, start:start + in_prompt]
        out[:, row:row + in_prompt] = table
        uneven = uneven or bool((table[1:] != table[:1]).any())
    return out if uneven else out[0]
