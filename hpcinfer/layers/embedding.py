"""Token embedding and LM head, split over the vocabulary for tensor parallelism."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.linear import NO_TP, TensorParallel, WeightShapeError, copy_checked


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split across ranks.

    Rank r holds rows ``[r * V/tp, (r + 1) * V/tp)``; a token outside them embeds to zero and
    the all-reduce fills it in from its owner. The vocabulary is padded up to a multiple of
    ``tp.size`` on each rank (the padding rows are never looked up).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = NO_TP):
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim),
                                   requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape != (self.num_embeddings, param.shape[1]):
            raise WeightShapeError((self.num_embeddings, param.shape[1]),
                                   tuple(loaded_weight.shape))
        rows = loaded_weight[self.vocab_start:self.vocab_start + self.rows_per_rank]
        with torch.no_grad():
            copy_checked(param.data[:rows.shape[0]], rows)
            param.data[rows.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, embedding_dim]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        is_mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight)
        out = out * is_mine.unsqueeze(-1).to(out.dtype)
        torch.distributed.all_reduce(out, group=self.tp.group)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab logits, split over the vocabulary like the embedding
    (so a tied head can share the embedding's parameter)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = NO_TP):
        super().__init__(num_embeddings, embedding_dim, tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("call compute_logits(hidden), not the LM head's forward")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, embedding_dim] -> logits [N, num_embeddings] in float32."""
        logits = fp32_logits(hidden, self.weight)
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            torch.distributed.all_gather(parts, logits, group=self.tp.group)
            logits = torch.cat(parts, dim=-1)
        return logits[:, :self.num_embeddings]


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] @ weight[V, H].T -> [N, V] float32, accumulated and *stored* in fp32.

    Why: a bf16 output rounds every logit to 8 mantissa bits, so near-ties (gap <= 1/128 of
    the logit) become exact ties whose argmax depends on the kernel's accumulation order;
    two backends then pick different tokens. Casting a bf16 result to float afterwards
    cannot undo that. On CUDA, cuBLAS writes fp32 directly from bf16/fp16 inputs
    (``torch.mm(..., out_dtype=float32)``), which also skips the bf16 logits round trip;
    elsewhere (CPU, older torch) the inputs are upcast first."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(hidden, weight)
    if hidden.is_cuda and hidden.dtype == weight.dtype:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # torch without the fp32-output mm: upcast below
    return F.linear(hidden.float(), weight.float())
