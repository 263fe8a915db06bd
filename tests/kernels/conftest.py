"""Fixtures of the kernel tests."""
import pytest


@pytest.fixture(params=[False, True], ids=["rows", "gqa_packed"])
def prefill_pack(request, monkeypatch):
    """Runs a prefill-kernel test with each tile layout: one query head per tile (the
    default) and PACK_GQA (the query heads of one KV head packed into a tile's rows)."""
    from hpcinfer.kernels import prefill_attention
    monkeypatch.setattr(prefill_attention, "PACK_GQA", request.param)
    return request.param
