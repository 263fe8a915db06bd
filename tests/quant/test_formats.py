"""The packers of hpcinfer.testing.quant and the unpackers of hpcinfer.layers.quant.reference
against literal words written from the formats' own definitions, so the greedy tests cannot
pass on a packer and an unpacker that agree with each other but not with the published tools."""
from __future__ import annotations

import torch

from hpcinfer.layers.quant import reference as ref
from hpcinfer.testing.quant import pack_awq, pack_sequential_cols, pack_sequential_rows

CODES = torch.arange(8, dtype=torch.int32)          # features 0..7 hold codes 0..7


def test_awq_gemm_word():
    # AutoAWQ: nibble i holds feature [0, 2, 4, 6, 1, 3, 5, 7][i]
    packed = pack_awq(CODES.reshape(1, 8))
    assert packed.item() == 0x75316420
    q, _, _ = ref.awq_canonical(packed, packed, torch.ones(1, 8))
    assert q.reshape(-1).tolist() == list(range(8))


def test_gptq_words_and_zero_minus_one():
    # qweight packs 8 input rows per word, nibble i = row 8j + i
    qweight = pack_sequential_rows(CODES.reshape(8, 1))
    assert qweight.shape == (1, 1) and qweight.item() == 0x76543210
    # symmetric 4-bit GPTQ (checkpoint_format "gptq") stores zero 8 as 7: 0x77777777
    qzeros = pack_sequential_cols(torch.full((1, 8), 8 - 1, dtype=torch.int32))
    assert qzeros.item() == 0x77777777
    q, zeros, _ = ref.gptq_canonical(qweight.expand(1, 8).contiguous(), qzeros,
                                     torch.ones(1, 8), zero_offset=1)
    assert q[0].tolist() == list(range(8)) and zeros.unique().tolist() == [8]


def test_compressed_tensors_offset_encoding():
    # pack-quantized stores signed values + 8 along the input: -8..-1 -> codes 0..7
    signed = torch.arange(-8, 0, dtype=torch.int32).reshape(1, 8)
    packed = pack_sequential_cols(signed + 8)
    assert packed.item() == 0x76543210
    q, zeros, _ = ref.pack_quantized_canonical(packed, torch.ones(1, 1))
    w = ref.dequant_int4(q, zeros, torch.ones(1, 1), torch.zeros(8, dtype=torch.int32))
    assert w.reshape(-1).tolist() == signed.reshape(-1).float().tolist()
    # zero points pack along the output (dim 0): 8 output rows in one word
    zp = pack_sequential_rows(torch.arange(8, dtype=torch.int32).reshape(8, 1))
    assert zp.shape == (1, 1) and zp.item() == 0x76543210
