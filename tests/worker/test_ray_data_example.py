"""configs/examples/ray-data-batch.yaml end to end on CPU: the Ray Data + vLLM template's job
(text prompts, a prompt template, Parquet with `prompt` and `generated_text`) as one job file,
run by the real worker through the local backend on a tiny checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpcinfer.testing.worker_jobs import run_worker

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "ray-data-batch.yaml"


def test_ray_data_example_writes_prompt_and_generated_text(tmp_path, model_dir, llm):
    import pyarrow.parquet as pq

    from hpcinfer import SamplingParams
    from hpcinfer.compile.jobdir import compile_job, write_job_dir
    from hpcinfer.config import load_job
    cfg = load_job(EXAMPLE, [f"model.id={model_dir}", f"output.dir={tmp_path / 'job'}"])
    rendered = compile_job(cfg)
    write_job_dir(rendered)
    rc, out = run_worker(rendered.job_dir)
    assert rc == 0, out

    lines = (EXAMPLE.parent / "data" / "prompts.txt").read_text().splitlines()
    [part] = sorted((rendered.job_dir / "shards" / "00000").glob("part-*.parquet")) or [None]
    table = pq.read_table(part)
    assert table.column_names == ["row_index", "id", "prompt", "generated_text",
                                  "num_prompt_tokens", "num_output_tokens", "finish_reason"]
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == lines
    assert [r["id"] for r in rows] == list(range(1, len(lines) + 1))    # line numbers
    params = SamplingParams(temperature=0.0, max_tokens=cfg.sampling.max_tokens,
                            stop=list(cfg.sampling.stop))
    expected = llm.generate([f"[INST] {line} [/INST]" for line in lines], params,
                            use_tqdm=False)
    assert [r["generated_text"] for r in rows] == [o.outputs[0].text for o in expected]
    assert all(r["num_output_tokens"] > 0 for r in rows)
