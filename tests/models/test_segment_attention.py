"""The vision towers' attention within segments (images, Qwen2.5-VL windows): runs of equal
lengths batched into one SDPA call must equal one call per segment, and nothing may leak
across segments."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcinfer.models.qwen2_vl import segment_attention


def per_segment(q, k, v, lengths):
    outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1),
                                           vi.transpose(0, 1)).transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outs)


def test_batched_runs_equal_one_call_per_segment():
    gen = torch.Generator().manual_seed(0)
    lengths = [16, 16, 16, 4, 4, 36, 16, 16, 64]     # runs of 3, 2, 1, 2, 1
    n = sum(lengths)
    q, k, v = (torch.randn(n, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    got = segment_attention(q, k, v, lengths)
    torch.testing.assert_close(got, per_segment(q, k, v, lengths), rtol=1e-12, atol=1e-12)
    # one segment of everything differs: the segments really are kept apart
    assert not torch.allclose(got, per_segment(q, k, v, [n]))


def test_one_length_is_one_view():
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    torch.testing.assert_close(segment_attention(q, k, v, [16] * 4),
                               per_segment(q, k, v, [16] * 4))
