"""Hub LoRA adapters: `hpcinfer download --adapter ID` and `download --job JOB` against the fake
hub on 127.0.0.1, then `validate` (offline) finding them and render pinning them to their
snapshots. docs/download.md, docs/lora.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcinfer.hub.errors import EXIT_CODE
from hpcinfer.hub.record import find_record
from hpcinfer.testing.fake_hub import FakeRepo, commit_sha

from .conftest import REPO_ROOT, HubEnv

HIDDEN, LAYERS, RANK = 8, 2, 4
ADAPTER = "org/lora"
WANTED = {"adapter_config.json", "adapter_model.safetensors"}


def adapter_files(hidden: int = HIDDEN) -> dict[str, bytes]:
    """A PEFT LoRA adapter (q_proj, v_proj) of a llama of width ``hidden``, with the extras
    real adapter repos carry (README, training state, a tokenizer) that are not fetched."""
    import numpy as np
    from safetensors.numpy import save
    rng = np.random.default_rng(1)
    tensors = {}
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, hidden), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, RANK), np.float32)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "bias": "none", "base_model_name_or_path": "org/tiny"}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save(tensors),
            "README.md": b"# a LoRA\n", "training_args.bin": b"\x80\x02pickle" * 4096,
            "tokenizer.json": b'{"version": "1.0"}'}


@pytest.fixture
def adapter_hub(tmp_path, hub_env: HubEnv):
    """hub_env with org/lora, org/bin-lora (.bin weights only) and org/wide-lora (another
    base's widths) beside the model org/tiny."""
    main = commit_sha("main")
    bin_only = {"adapter_config.json": adapter_files()["adapter_config.json"],
                "adapter_model.bin": b"\x80\x02pickle"}
    hub_env.hub.repos.update({
        ADAPTER: FakeRepo(commits={main: adapter_files()}, refs={"main": main}),
        "org/bin-lora": FakeRepo(commits={main: bin_only}, refs={"main": main}),
        "org/wide-lora": FakeRepo(commits={main: adapter_files(hidden=16)}, refs={"main": main}),
    })
    return hub_env


def _one_line_error(proc, *needles):
    assert proc.returncode == EXIT_CODE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def test_download_adapter_fetches_its_two_files_and_records_them(adapter_hub):
    proc = adapter_hub.run("download", "--adapter", ADAPTER)
    assert proc.returncode == 0, proc.stderr
    snap = adapter_hub.cache / "models--org--lora" / "snapshots" / commit_sha("main")
    assert _tree(snap) == WANTED
    assert not adapter_hub.hub.gets_of("training_args.bin")
    assert not adapter_hub.hub.gets_of("README.md")
    record = find_record(ADAPTER, cache_dir=adapter_hub.cache)
    assert Path(record.path) == snap.resolve() and set(record.files) == WANTED
    assert str(snap) in proc.stdout
    verified = adapter_hub.run("verify-model", ADAPTER)
    assert verified.returncode == 0 and "ok:" in verified.stdout, verified.stderr


def test_download_adapter_refuses_what_is_not_one(adapter_hub):
    _one_line_error(adapter_hub.run("download", "--adapter", "org/tiny"),
                    "org/tiny at main is not a PEFT LoRA adapter", "hpcinfer download org/tiny")
    assert not adapter_hub.hub.gets_of("model-00001-of-00002.safetensors")
    _one_line_error(adapter_hub.run("download", "--adapter", "org/bin-lora"),
                    "has no adapter_model.safetensors", "save_pretrained")
    _one_line_error(adapter_hub.run("download", "--adapter", "org/tiny", "--include", "*.md"),
                    "drop --include/--exclude")
    _one_line_error(adapter_hub.run("download"), "hpcinfer download --job job.yaml")


# --- jobs ---

def _base_dir(root: Path) -> Path:
    """A local llama base the adapters fit (config.json is all validate reads of it)."""
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
        "num_hidden_layers": LAYERS, "vocab_size": 64, "max_position_embeddings": 128}))
    return base


def _job(root: Path, adapters: dict[str, str]) -> Path:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "rows.jsonl").write_text('{"id": "x", "prompt": "hi", "adapter": "a"}\n')
    job = {"name": "w", "cluster": "generic", "task": "generate",
           "model": {"id": str(_base_dir(root))},
           "input": {"path": "data/rows.jsonl", "id_field": "id", "prompt_field": "prompt",
                     "adapter_field": "adapter"},
           "output": {"dir": "out"}, "sampling": {"max_tokens": 4},
           "resources": {"device": "cpu", "time": "00:05:00", "cpus_per_task": 1, "mem": "2G"},
           "lora": {"adapters": adapters}}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return root / "job.yaml"


def _hpcinfer(hub_env: HubEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], env=hub_env.env,
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_download_job_then_validate_finds_and_render_pins_the_adapter(tmp_path, adapter_hub,
                                                                      monkeypatch):
    local = tmp_path / "local-lora"
    local.mkdir()
    for name in WANTED:
        (local / name).write_bytes(adapter_files()[name])
    job = _job(tmp_path, {"a": ADAPTER, "b": str(local)})

    before = _hpcinfer(adapter_hub, "validate", str(job))
    assert before.returncode == 2, before.stderr
    assert "lora.adapters.a" in before.stderr
    assert f"run `hpcinfer download --job {job}` on the login node" in before.stderr

    proc = adapter_hub.run("download", "--job", str(job))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-> commit") == 1 and ADAPTER in proc.stdout   # b is local
    snap = adapter_hub.cache / "models--org--lora" / "snapshots" / commit_sha("main")
    assert _tree(snap) == WANTED

    after = _hpcinfer(adapter_hub, "validate", str(job))
    assert after.returncode == 0, after.stderr

    # What render writes into job.yaml: the snapshot, an absolute directory
    from hpcinfer.compile.model import resolve_job_model
    from hpcinfer.config import load_job
    monkeypatch.setenv("HF_HUB_CACHE", str(adapter_hub.cache))
    cfg = resolve_job_model(load_job(job))
    assert cfg.lora.adapters == {"a": str(snap.resolve()), "b": str(local)}


def test_validate_checks_a_hub_adapter_against_the_base(tmp_path, adapter_hub):
    job = _job(tmp_path, {"a": "org/wide-lora"})
    assert adapter_hub.run("download", "--job", str(job)).returncode == 0
    proc = _hpcinfer(adapter_hub, "validate", str(job))
    assert proc.returncode == 2
    assert "lora.adapters.a" in proc.stderr and "does not fit model" in proc.stderr


def test_render_download_fetches_a_missing_adapter(tmp_path, adapter_hub):
    job = _job(tmp_path, {"a": ADAPTER})
    proc = _hpcinfer(adapter_hub, "render", str(job), "--download", "--out",
                     str(tmp_path / "jobdir"))
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load((tmp_path / "jobdir" / "job.yaml").read_text())
    snap = adapter_hub.cache / "models--org--lora" / "snapshots" / commit_sha("main")
    assert rendered["lora"]["adapters"] == {"a": str(snap.resolve())}


def test_download_job_stays_off_torch(tmp_path, adapter_hub):
    # the login side: torch, transformers and triton are never imported by a download
    job = _job(tmp_path, {"a": ADAPTER})
    code = ("import sys; from hpcinfer.hub.cli import main; "
            f"rc = main(['download', '--job', {str(job)!r}]); "
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; "
            "print('heavy', heavy); sys.exit(rc or bool(heavy))")
    proc = adapter_hub.run_python(code)
    assert proc.returncode == 0 and "heavy []" in proc.stdout, proc.stdout + proc.stderr
