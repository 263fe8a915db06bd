"""bench/real_model_agreement.py --quant on a tiny checkpoint (CPU): every quantized path runs
through the method it names, and the stats compare against the bf16 path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "real_model_agreement.py"


def test_quant_agreement_rows(base_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("real_model_agreement", BENCH)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = [[5, 9, 17, 33], [40, 41, 42]]
    row = script.measure_quant(str(base_dir), "tiny", prompts, max_new=4, device="cpu",
                               w4a16_group=64, work_dir=tmp_path)
    assert row["bf16_vs_fp32"]["linear_layers"] == {"UnquantizedMethod: bfloat16 weight": 8}
    assert row["fp8"]["linear_layers"] == {"Fp8OnlineMethod: bfloat16 weight": 8}
    assert row["w4a16-awq"]["linear_layers"] == {"Int4Method: bfloat16 weight": 8}
    for label in script.QUANT_PATHS:
        got = row[label]
        assert got["identical"].endswith("/2") and 0 <= got["prefix_share"] <= 1
        assert 0 <= got["positions"] <= 1 and 0 < got["teacher_forced"] <= 1
    # --copy-model's prompts: workload A's (256 seeded random ids each, as the copy model
    # was trained on)
    prompts = script.copy_prompts(3)
    assert len(prompts) == 3 and {len(p) for p in prompts} == {256}
    assert all(0 <= t < 128000 for p in prompts for t in p)
