"""bench/throughput.py's side-by-side machinery (issue 22) on CPU, at workload T.

vLLM is not installable here, so a stand-in ``vllm`` package (written to a tmp dir and put on
PYTHONPATH) takes its place: it accepts only the arguments of vLLM's documented offline API
that the bench's vLLM runner passes (LLM(...), SamplingParams(...), vllm.inputs.TokensPrompt,
LLM.generate, LLM.reset_prefix_cache), refuses to start without VLLM_USE_FLASHINFER_SAMPLER=0
(as the GPU machine's vLLM does), logs every call, and generates with our own engine on the
CPU, so its first tokens must equal hpcinfer's. The bench's real vLLM path is the same code;
only the package behind ``import vllm`` differs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

FAKE_VLLM = '''
"""Stand-in for vllm (tests/test_bench_throughput_engines.py): vLLM's offline API names over
hpcinfer on the CPU; every call is appended to $FAKE_VLLM_LOG."""
import json
import os
from dataclasses import asdict, dataclass

__version__ = "0.0.0+fake"


def _log(event, **fields):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\\n")


@dataclass
class SamplingParams:   # only the fields the bench may pass; anything else is a TypeError
    temperature: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    detokenize: bool = True


class LLM:
    def __init__(self, model, *, dtype, max_model_len, skip_tokenizer_init,
                 gpu_memory_utilization, seed, enable_prefix_caching=True):
        if os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") != "0":
            raise ModuleNotFoundError("No module named 'flashinfer'")
        _log("init", model=model, dtype=dtype, max_model_len=max_model_len,
             skip_tokenizer_init=skip_tokenizer_init, enable_prefix_caching=enable_prefix_caching)
        import hpcinfer
        self._llm = hpcinfer.LLM(model, dtype=dtype, max_model_len=max_model_len,
                                 device="cpu", enable_prefix_caching=enable_prefix_caching,
                                 max_num_seqs=8, seed=seed)

    def reset_prefix_cache(self):
        _log("reset_prefix_cache")
        return self._llm.reset_prefix_cache()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        import hpcinfer
        assert all(set(p) == {"prompt_token_ids"} for p in prompts), prompts[:1]
        _log("generate", num_prompts=len(prompts),
             params=[asdict(s) for s in sampling_params[:1]])
        ours = [hpcinfer.SamplingParams(**asdict(s)) for s in sampling_params]
        return self._llm.generate(list(prompts), ours, use_tqdm=False)
'''

FAKE_INPUTS = '''
def TokensPrompt(*, prompt_token_ids):
    return {"prompt_token_ids": list(prompt_token_ids)}
'''


def _throughput_module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_throughput", BENCH / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_workload_p_shares_one_system_prompt():
    tp = _throughput_module()
    requests = tp.make_requests("P", 5)
    system = requests[0][0][:1024]
    assert all(len(p) == 1088 and p[:1024] == system and o == 128 for p, o in requests)
    assert len({tuple(p[1024:]) for p, _ in requests}) == 5   # each its own question
    assert tp.WORKLOADS["P"]["num_prompts"] == 2000
    assert tp.shape_of(tp.WORKLOADS["P"]["shape"])["hidden_size"] == 4096   # 8B shape
    warm = tp.make_requests("P", 5, seed=1)
    assert warm[0][0][:1024] != system   # warm-up never fills the timed prefix
    assert tp.prefix_caching_for("P") and not tp.prefix_caching_for("A")
    assert not tp.prefix_caching_for("P", "off") and tp.prefix_caching_for("B", "on")
    assert tp.first_token_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert tp.first_token_agreement([1, 2], [1]) is None


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    """One tiny checkpoint for the module's runs (writing it takes seconds)."""
    return tmp_path_factory.mktemp("ckpt")


def _run(tmp_path, ckpt_root, engines, extra_path=None, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FAKE_VLLM_LOG": str(tmp_path / "vllm.log")}
    env.pop("VLLM_USE_FLASHINFER_SAMPLER", None)   # the bench must set it for vLLM itself
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--workloads", "T", "--device", "cpu",
         "--engines", engines, "--processes", str(processes), "--num-prompts", "6",
         "--out", str(tmp_path / "results"), "--ckpt-root", str(ckpt_root)],
        env=env, capture_output=True, text=True, timeout=600, check=False)


def test_side_by_side_with_a_stand_in_vllm(tmp_path, ckpt_root):
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (site / "vllm" / "inputs.py").write_text(textwrap.dedent(FAKE_INPUTS))
    proc = _run(tmp_path, ckpt_root, "hpcinfer,vllm,transformers", site)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

    (results,) = (tmp_path / "results").glob("*.json")
    rows = json.loads(results.read_text())
    # engines interleaved per process index, every one in its own process
    assert [(r["engine"], r["process"]) for r in rows] == [
        ("hpcinfer", 0), ("vllm", 0), ("transformers", 0),
        ("hpcinfer", 1), ("vllm", 1), ("transformers", 1)]
    requests = _throughput_module().make_requests("T", 6)
    for r in rows:
        for key in ("engine", "workload", "tp", "output_tok_s", "total_tok_s", "device", "date",
                    "process", "startup_s", "engine_version"):
            assert r.get(key) is not None, (key, r)
        assert r["workload"] == "T" and r["exact_tokens"] is True, r
        assert r["num_output_tokens"] == sum(o for _, o in requests)
        assert "first_tokens" not in r   # printed as agreement, not stored per prompt
    for r in (r for r in rows if r["engine"] == "hpcinfer"):   # where the step loop ran
        placement = r["cpu_placement"]
        assert placement["allowed_cpus"] and len(placement["reps"]) == 1, placement
        assert placement["reps"][0]["cpu_end"] in placement["allowed_cpus"], placement
        assert placement["reps"][0]["voluntary_switches"] >= 0, placement
    vllm_rows = [r for r in rows if r["engine"] == "vllm"]
    assert all(r["engine_version"] == "0.0.0+fake" and r["import_s"] >= 0 for r in vllm_rows)
    # the stand-in runs our engine: its first tokens are hpcinfer's
    assert all(r["first_token_agreement_vs_hpcinfer"] == 1.0 for r in vllm_rows)

    calls = [json.loads(line) for line in (tmp_path / "vllm.log").read_text().splitlines()]
    per_process = [c["event"] for c in calls]
    assert per_process == ["init", "generate", "reset_prefix_cache", "generate"] * 2
    hp = _throughput_module().max_model_len_for(requests)
    for init in (c for c in calls if c["event"] == "init"):
        assert init["max_model_len"] == hp and init["skip_tokenizer_init"] is True
        assert init["enable_prefix_caching"] is True   # vLLM's default left alone
    warm, timed = calls[1], calls[3]
    assert warm["num_prompts"] == 6 and timed["num_prompts"] == 6
    assert warm["params"][0]["max_tokens"] == warm["params"][0]["min_tokens"] == 4
    want = requests[0][1]
    assert timed["params"][0] == {"temperature": 0, "max_tokens": want, "min_tokens": want,
                                  "ignore_eos": True, "detokenize": False}

    # every process's number and the medians, then the agreement lines
    for engine in ("hpcinfer", "vllm", "transformers"):
        each = ", ".join(f"{r['output_tok_s']:.0f}" for r in rows if r["engine"] == engine)
        assert any(line.startswith(engine) and line.endswith(each)
                   for line in out.splitlines()), (engine, each, out[-2000:])
    assert "first-token agreement on T: hpcinfer vs vllm: 100.0% of 6 prompts" in out
    assert "first-token agreement on T: hpcinfer vs transformers:" in out

    # The GPU machine's two-call run: vLLM alone later, against hpcinfer's stored first tokens
    (tmp_path / "call2").mkdir()
    again = _run(tmp_path / "call2", ckpt_root, "vllm", site, processes=1)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "first tokens of hpcinfer on T: from an earlier run" in again.stdout
    assert "first-token agreement on T: hpcinfer vs vllm: 100.0% of 6 prompts" in again.stdout
    assert "hpcinfer vs transformers" not in again.stdout   # neither measured in this run
    (results,) = (tmp_path / "call2" / "results").glob("*.json")
    (row,) = json.loads(results.read_text())
    assert row["engine"] == "vllm" and row["first_token_agreement_vs_hpcinfer"] == 1.0


def test_engine_that_is_not_importable_is_skipped_in_one_line(tmp_path, ckpt_root):
    proc = _run(tmp_path, ckpt_root, "vllm", processes=1)   # no vllm on this machine's path
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if "vllm" in line and "skip" in line]
    assert skipped == ["vllm: not importable here (no vllm package); skipped"], proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()   # nothing ran, no rows
