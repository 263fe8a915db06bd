"""Loading: layer precedence, path resolution, YAML 1.2 scalars, Slurm times, resolved round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpcinfer.config import ConfigError, load_job, load_resolved
from hpcinfer.config.units import normalize_mem, normalize_time
from hpcinfer.testing.jobs import MINIMAL_JOB as BASE
from hpcinfer.testing.jobs import write_job_text as write_job


def test_precedence_profile_then_file_then_set(tmp_path):
    image = tmp_path / "img.sif"
    image.write_text("sif")
    # aau-ai-cloud sets resources.time 04:00:00 and mem 64G; the file overrides time only.
    path = write_job(tmp_path, BASE + "cluster: aau-ai-cloud\n"
                     f"container: {{image: {image}}}\nresources:\n  time: '02:00:00'\n")
    from_profile_and_file = load_job(path)
    assert from_profile_and_file.resources.mem == "64G"            # profile
    assert from_profile_and_file.resources.time == "02:00:00"      # file beats profile
    overridden = load_job(path, ["resources.time=30", "resources.mem=8G"])
    assert overridden.resources.time == "00:30:00"                 # --set beats file
    assert overridden.resources.mem == "8G"                        # --set beats profile
    assert overridden.location_of("resources.time") == ("--set resources.time=30", None)
    assert overridden.location_of("resources.cpus_per_task")[0] == \
        "configs/clusters/aau-ai-cloud.yaml"
    assert from_profile_and_file.location_of("resources.time") == (str(path), 7)


def test_later_set_wins_and_set_can_replace_a_block(tmp_path):
    path = write_job(tmp_path, BASE)
    cfg = load_job(path, ["sampling.temperature=0.5", "sampling.temperature=0",
                          "sampling={max_tokens: 5}"])
    assert cfg.sampling.max_tokens == 5 and cfg.sampling.temperature == 1.0
    cfg = load_job(path, ["sampling={max_tokens: 5}", "sampling.seed=3"])
    assert (cfg.sampling.max_tokens, cfg.sampling.seed) == (5, 3)


def test_set_values_are_yaml_typed(tmp_path):
    cfg = load_job(write_job(tmp_path, BASE), [
        "sampling.stop=[END, '###']", "sampling.seed=7", "engine.enforce_eager=true",
        "env={A: '1', B: two}", "input.path=[a.jsonl, 'b dir/*.jsonl']"])
    assert cfg.sampling.stop == ("END", "###") and cfg.sampling.seed == 7
    assert cfg.engine.enforce_eager is True and cfg.env == {"A": "1", "B": "two"}
    assert cfg.input.path == (str(tmp_path / "a.jsonl"), str(tmp_path / "b dir/*.jsonl"))


def test_profile_container_comes_with_its_runtime_and_null_turns_it_off(tmp_path):
    image = tmp_path / "img.sif"
    image.write_text("sif")
    path = write_job(tmp_path, BASE + "cluster: aau-ai-cloud\n")
    cfg = load_job(path, [f"container.image={image}"])
    assert cfg.container.runtime == "singularity" and cfg.profile.container_runtime == "singularity"
    assert cfg.profile.env_from_environment == ("HF_TOKEN",)
    assert load_job(path, ["container=null"]).container is None
    own = load_job(path, [f"container.image={image}", "container.runtime=apptainer"])
    assert own.container.runtime == "apptainer"


def test_relative_paths_resolve_against_the_job_file_directory(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "img.sif").write_text("sif")
    sub = tmp_path / "jobs"
    sub.mkdir()
    path = write_job(sub, """\
        name: t1
        model: {id: ../ckpt, tokenizer: org/tok}
        input: {path: ["data/*.jsonl", /abs/in.parquet]}
        output: {dir: ~/res}
        container: {image: ../img.sif, binds: ["../data:/data:ro", /scratch]}
        """)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir("/")
    cfg = load_job(path)
    assert cfg.model.id == str(tmp_path / "ckpt") and cfg.model.tokenizer == "org/tok"
    assert cfg.input.path == (str(sub / "data/*.jsonl"), "/abs/in.parquet")
    assert cfg.output.dir == str(tmp_path / "res")
    assert cfg.container.image == str(tmp_path / "img.sif")
    assert cfg.container.binds == (f"{tmp_path / 'data'}:/data:ro", "/scratch")
    assert cfg.source_file == str(path)


def test_output_dir_defaults_to_results_name_and_expands_env(tmp_path, monkeypatch):
    assert load_job(write_job(tmp_path, BASE)).output.dir == str(tmp_path / "results/t1")
    monkeypatch.setenv("SCRATCH_T", str(tmp_path / "scratch"))
    cfg = load_job(write_job(tmp_path, BASE + "output: {dir: $SCRATCH_T/x}\n", "j2.yaml"))
    assert cfg.output.dir == str(tmp_path / "scratch/x")


def test_hub_ids_stay_ids(tmp_path):
    cfg = load_job(write_job(tmp_path, BASE))
    assert cfg.model.id == "org/model"


def test_yaml_12_scalars(tmp_path):
    # Under YAML 1.1 these would be 14400, False and a date.
    text = BASE.replace("{id: org/model}", "{id: org/model, revision: 2024-01-01}")
    cfg = load_job(write_job(tmp_path, text + "resources: {time: 4:00:00}\n"
                             "env: {COUNTRY: NO, FLAG: yes}\n"))
    assert cfg.resources.time == "04:00:00"
    assert cfg.env == {"COUNTRY": "NO", "FLAG": "yes"}
    assert cfg.model.revision == "2024-01-01"


@pytest.mark.parametrize("value, expected", [
    (90, "01:30:00"), ("90", "01:30:00"), ("30:15", "00:30:15"), ("4:00:00", "04:00:00"),
    ("36:00:00", "1-12:00:00"), ("1-2", "1-02:00:00"), ("1-2:30", "1-02:30:00"),
    ("2-00:00:00", "2-00:00:00"), ("unlimited", "UNLIMITED"),
])
def test_slurm_time_forms_normalise(value, expected):
    assert normalize_time(value) == expected


@pytest.mark.parametrize("value", ["4h", "1-25", "1:61:00", "0", "", "1.5", True, 2.5])
def test_slurm_time_rejects(value):
    with pytest.raises(ValueError):
        normalize_time(value)


@pytest.mark.parametrize("value, expected", [("64G", "64G"), ("64gb", "64G"), (4000, "4000M"),
                                             ("1t", "1T"), ("512M", "512M")])
def test_memory_forms_normalise(value, expected):
    assert normalize_mem(value) == expected


def test_bad_memory_says_what_to_write(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_job(write_job(tmp_path, BASE + "resources: {mem: 64 GiB}\n"))
    assert info.value.line == 4 and '"64G"' in info.value.fix


def test_resolved_yaml_round_trips_and_is_deterministic(tmp_path):
    path = write_job(tmp_path, BASE + "cluster: alliance-canada\n"
                     "resources: {account: def-pi, time: 1-0}\nenv: {X: 'a b $(c)'}\n")
    cfg = load_job(path, ["sampling.stop=[x]"])
    text = cfg.to_yaml()
    assert text == load_job(path, ["sampling.stop=[x]"]).to_yaml()
    assert text.startswith("# Fully resolved by hpcinfer")
    assert "# Override: --set sampling.stop=[x]" in text
    job_dir = tmp_path / "jobdir"
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(text)
    back = load_resolved(job_dir)
    assert back.model_dump() == cfg.model_dump()
    assert back.profile == cfg.profile and back.profile.requires_account
    assert back.profile.modules == ("StdEnv/2023", "python/3.12")
    assert back.profile.container_modules == ("apptainer",)
    assert back.location_of("resources.account")[0] == str(job_dir / "job.yaml")
    def body(yaml_text):
        return [line for line in yaml_text.splitlines() if not line.startswith("#")]
    assert body(back.to_yaml()) == body(text)


def test_resolved_yaml_without_slurm_block_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text(BASE)
    with pytest.raises(ConfigError) as info:
        load_resolved(tmp_path / "job.yaml")
    assert info.value.key_path == "slurm" and "render the job again" in info.value.fix


def test_error_at_points_later_errors_at_the_right_line(tmp_path):
    cfg = load_job(write_job(tmp_path, BASE))
    err = cfg.error_at("input.path", "no file matches data/*.jsonl", "check the glob")
    assert str(err) == f"{tmp_path / 'job.yaml'}:3: input.path: no file matches data/*.jsonl; " \
                       "check the glob"
    assert cfg.location_of("input.path.0") == (str(tmp_path / "job.yaml"), 3)
    # A key the file never set falls back to its nearest parent, then to the file.
    assert cfg.location_of("sampling.seed") == (str(tmp_path / "job.yaml"), None)


def test_config_is_frozen(tmp_path):
    cfg = load_job(write_job(tmp_path, BASE))
    with pytest.raises(Exception):
        cfg.name = "other"
    with pytest.raises(Exception):
        cfg.resources.time = "1"


def test_quickstart_example_loads(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    cfg = load_job(repo / "configs/examples/quickstart.yaml",
                   [f"output.dir={tmp_path / 'out'}"])
    assert cfg.resources.device == "cpu" and cfg.cluster == "generic"
    assert Path(cfg.model.id).is_dir() and (Path(cfg.model.id) / "config.json").is_file()
    files = sorted(Path(cfg.input.path[0]).parent.glob(Path(cfg.input.path[0]).name))
    assert [f.name for f in files] == ["part-a.jsonl", "part-b.jsonl"]


@pytest.mark.parametrize("example", sorted(
    p.name for p in (Path(__file__).resolve().parents[2] / "configs/examples").glob("*.yaml")))
def test_every_example_validates(example, monkeypatch):
    # Site paths ($PROJECT, /home/container) do not exist here: schema and consistency only.
    monkeypatch.setenv("PROJECT", "/project/def-yourpi")
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    repo = Path(__file__).resolve().parents[2]
    cfg = load_job(repo / "configs/examples" / example, check_environment=False)
    assert cfg.name and cfg.profile is not None
