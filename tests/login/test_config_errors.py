"""Every config error path: one line, file:line where there is one, and what to write instead."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcinfer.config import ConfigError, load_job
from hpcinfer.config import checks as checks_module
from hpcinfer.testing.jobs import MINIMAL_JOB as BASE
from hpcinfer.testing.jobs import write_job_text as write_job


def error_of(path: Path, overrides=(), **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides, **kwargs)
    err = info.value
    assert "\n" not in str(err), "a ConfigError must print as one line"
    return err


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write_job(tmp_path, BASE + "resources:\n  time: 01:00:00\n   mem: 4G\n")
    err = error_of(path)
    assert err.line == 6 and err.file == str(path)
    assert str(err).startswith(f"{path}:6: YAML syntax error (column")
    assert "indentation" in err.fix


def test_tab_indentation_is_a_syntax_error_with_line(tmp_path):
    path = write_job(tmp_path, BASE + "resources:\n\ttime: 10\n")
    err = error_of(path)
    assert err.line == 5 and "syntax" in err.problem


def test_wrong_type_names_key_line_and_example(tmp_path):
    path = write_job(tmp_path, BASE + "parallel:\n  tensor: two\n")
    err = error_of(path)
    assert (err.line, err.key_path) == (5, "parallel.tensor")
    assert "expected a whole number, got 'two'" in err.problem
    assert "tensor: 4" in err.fix


def test_section_given_as_a_scalar_suggests_the_mapping(tmp_path):
    path = write_job(tmp_path, "name: t1\nmodel: meta-llama/Llama-3.1-8B\ninput: {path: x}\n")
    err = error_of(path)
    assert (err.line, err.key_path) == (2, "model")
    assert "model: {id: meta-llama/Llama-3.1-8B}" in err.fix


@pytest.mark.parametrize("text, line, key_path, suggestion", [
    (BASE + "resourses:\n  time: 10\n", 4, "resourses", "'resources'"),
    (BASE + "sampling:\n  temperture: 0.5\n", 5, "sampling.temperture", "'temperature'"),
    (BASE + "resources:\n  gpus_per_nod: 2\n", 5, "resources.gpus_per_nod", "'gpus_per_node'"),
])
def test_unknown_key_has_did_you_mean_and_the_valid_keys(tmp_path, text, line, key_path,
                                                         suggestion):
    err = error_of(write_job(tmp_path, text))
    assert (err.line, err.key_path) == (line, key_path)
    assert f"did you mean {suggestion}?" in err.fix
    assert "valid keys here:" in err.fix


def test_unknown_key_without_a_close_match_still_lists_valid_keys(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "zzzz: 1\n"))
    assert "did you mean" not in err.fix
    assert "name, cluster, task, model" in err.fix


def test_unknown_cluster_profile_lists_available_ones(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "cluster: aau\n"))
    assert (err.line, err.key_path) == (4, "cluster")
    assert "unknown cluster profile 'aau'" in err.problem
    assert "did you mean 'aau-ai-cloud'?" in err.fix
    assert "aau-ai-cloud, alliance-canada, generic" in err.fix


def test_missing_profile_path_is_reported_at_the_cluster_line(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "cluster: ./nowhere.yaml\n"))
    assert (err.line, err.key_path) == (4, "cluster")
    assert "does not exist" in err.problem


def test_bad_time_says_what_to_write(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "resources:\n  time: 4h\n"))
    assert str(err) == (
        f"{tmp_path / 'job.yaml'}:5: resources.time: '4h' is not a Slurm time; write "
        '"04:00:00" (HH:MM:SS), "2-00:00:00" (D-HH:MM:SS) or minutes as a number (e.g. 240)')


@pytest.mark.parametrize("gpus", [0, -2])
def test_zero_or_negative_gpus_point_at_device_cpu(tmp_path, gpus):
    err = error_of(write_job(tmp_path, BASE + f"resources:\n  gpus_per_node: {gpus}\n"))
    assert (err.line, err.key_path) == (5, "resources.gpus_per_node")
    assert "device: cpu" in err.fix


def test_tensor_times_pipeline_must_divide_gpus_times_nodes(tmp_path):
    assert load_job(write_job(tmp_path, BASE + "parallel:\n  tensor: 2\nresources:\n"
                              "  gpus_per_node: 4\n")).ranks_per_node == 4   # 2 replicas
    text = BASE + "parallel:\n  tensor: 3\nresources:\n  gpus_per_node: 4\n"
    err = error_of(write_job(tmp_path, text, name="j2.yaml"))
    assert (err.line, err.key_path) == (4, "parallel")
    assert "tensor (3) x pipeline (1) = 3 ranks per replica, which does not divide " \
        "gpus_per_node (4) x nodes (1) = 4 GPUs" in err.problem
    assert "[1, 2, 4]" in err.fix and "gpus_per_node: 3" in err.fix


def test_tensor_group_must_fit_in_a_node(tmp_path):
    text = BASE + "parallel: {tensor: 4, nodes: 2}\nresources: {gpus_per_node: 2}\n"
    err = error_of(write_job(tmp_path, text))
    assert err.key_path == "parallel.tensor" and "inside one node" in err.problem


def test_cpu_device_needs_no_gpus_but_ranks_must_split_over_nodes(tmp_path):
    ok = load_job(write_job(tmp_path, BASE + "resources: {device: cpu, gpus_per_node: 1}\n"
                            "parallel: {tensor: 2}\n"))
    assert ok.ranks_per_node == 2
    err = error_of(write_job(tmp_path, BASE + "resources: {device: cpu}\n"
                             "parallel: {tensor: 3, nodes: 2}\n", name="j2.yaml"))
    assert err.key_path == "parallel.nodes" and "do not split evenly" in err.problem


def test_account_missing_where_the_profile_requires_one(tmp_path, monkeypatch):
    for name in checks_module.ACCOUNT_ENV:
        monkeypatch.delenv(name, raising=False)
    path = write_job(tmp_path, BASE + "cluster: alliance-canada\nresources:\n  time: 60\n")
    err = error_of(path)
    assert (err.line, err.key_path) == (5, "resources")
    assert "requires a Slurm account" in err.problem and "account: def-<pi>" in err.fix
    # Each way of giving one satisfies it.
    assert load_job(path, ["resources.account=def-pi"]).resources.account == "def-pi"
    monkeypatch.setenv("SBATCH_ACCOUNT", "def-pi")
    assert load_job(path).resources.account is None


def test_output_dir_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "blocker").write_text("x")
    err = error_of(write_job(tmp_path, BASE + "output: {dir: blocker/results}\n"))
    assert (err.line, err.key_path) == (4, "output.dir")
    assert "cannot be created" in err.problem and "choose a directory" in err.fix


def test_unwritable_output_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root bypasses mode bits: make access() answer as for a user
        real_access = os.access
        monkeypatch.setattr(checks_module.os, "access",
                            lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    err = error_of(write_job(tmp_path, BASE + "output:\n  dir: locked/run1\n"))
    assert (err.line, err.key_path) == (5, "output.dir")
    assert f"{locked} is not writable" in err.problem


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    err = error_of(write_job(tmp_path, BASE + "output: {dir: out}\n"))
    assert "is not a directory" in err.problem


def test_missing_container_image(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "container:\n  image: images/x.sif\n"))
    assert (err.line, err.key_path) == (5, "container.image")
    assert f"{tmp_path / 'images/x.sif'} does not exist" in err.problem
    assert "container: null" in err.fix


def test_remote_image_on_an_offline_cluster(tmp_path):
    text = BASE + "cluster: alliance-canada\nresources: {account: def-x}\n" \
                  "container: {image: 'docker://vllm/vllm-openai'}\n"
    err = error_of(write_job(tmp_path, text))
    assert err.key_path == "container.image" and "offline" in err.problem
    assert "apptainer pull" in err.fix


def test_environment_checks_can_be_skipped(tmp_path):
    path = write_job(tmp_path, BASE + "container:\n  image: images/x.sif\n")
    assert load_job(path, check_environment=False).container.image == str(tmp_path / "images/x.sif")


@pytest.mark.parametrize("override, key_path, problem, fix", [
    ("resources.time", "", "--set expects KEY=VALUE, got 'resources.time'",
     "--set key.path=value"),
    ("=4", "", "--set expects KEY=VALUE, got '=4'", "--set key.path=value"),
    ("resources..time=4", "resources..time", "empty part", "--set key.path=value"),
    ("sampling.stop=[a, b", "sampling.stop", "not valid YAML", "quote it"),
    ("input.path.0=x", "input.path.0", "list items", "--set input.path=[a, b]"),
    ("name.first=x", "name", "plain value", "--set name=..."),
])
def test_bad_set_override(tmp_path, override, key_path, problem, fix):
    err = error_of(write_job(tmp_path, BASE), [override])
    assert err.file == f"--set {override}" and err.line is None
    assert err.key_path == key_path and problem in err.problem and fix in err.fix


def test_set_override_with_a_bad_value_names_the_override(tmp_path):
    err = error_of(write_job(tmp_path, BASE), ["resources.time=4h"])
    assert str(err).startswith("--set resources.time=4h: resources.time: '4h' is not a Slurm")


def test_set_override_with_an_unknown_key(tmp_path):
    err = error_of(write_job(tmp_path, BASE), ["sampling.temprature=0"])
    assert err.file == "--set sampling.temprature=0"
    assert "did you mean 'temperature'?" in err.fix


def test_duplicate_key(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "name: t2\n"))
    assert (err.line, err.key_path) == (4, "name") and "first set on line 1" in err.problem


def test_missing_required_key_points_at_its_parent(tmp_path):
    err = error_of(write_job(tmp_path, "name: t1\nmodel: {revision: main}\ninput: {path: x}\n"))
    assert (err.line, err.key_path) == (2, "model.id")
    assert err.problem == "required key is missing"
    assert "add `id: meta-llama/Llama-3.1-8B-Instruct` under model" in err.fix


def test_literal_value_gets_did_you_mean(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "task: chatt\n"))
    assert (err.line, err.key_path) == (4, "task")
    assert "did you mean 'chat'?" in err.fix and "generate, chat, embed" in err.fix


def test_bad_name_characters(tmp_path):
    err = error_of(write_job(tmp_path, BASE.replace("name: t1", "name: my job/1")))
    assert (err.line, err.key_path) == (1, "name") and "letters, digits" in err.fix


def test_empty_missing_and_non_mapping_files(tmp_path):
    assert error_of(write_job(tmp_path, "")).problem == "the file is empty"
    assert error_of(tmp_path / "nope.yaml").problem == "file not found"
    assert "must be a mapping" in error_of(write_job(tmp_path, "- a\n- b\n")).problem


def test_slurm_block_belongs_to_the_profile(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "slurm: {max_array_size: 5}\n"))
    assert (err.line, err.key_path) == (4, "slurm") and "cluster: ./my-cluster.yaml" in err.fix
    err = error_of(write_job(tmp_path, BASE, name="j2.yaml"), ["slurm.launcher=mpirun"])
    assert err.key_path == "slurm" and err.file == "--set slurm.launcher=mpirun"


def test_unset_environment_variable_in_a_path(tmp_path, monkeypatch):
    monkeypatch.delenv("HPCINFER_TEST_UNSET", raising=False)
    err = error_of(write_job(tmp_path, BASE + "output: {dir: $HPCINFER_TEST_UNSET/out}\n"))
    assert (err.line, err.key_path) == (4, "output.dir")
    assert "$HPCINFER_TEST_UNSET is not set" in err.problem


def test_extra_sbatch_cannot_fight_managed_flags(tmp_path):
    text = BASE + "resources:\n  extra_sbatch:\n    mail-type: END\n    time: '10'\n"
    err = error_of(write_job(tmp_path, text))
    assert (err.line, err.key_path) == (7, "resources.extra_sbatch.time")
    assert err.fix == "set resources.time instead"


def test_task_needs_its_input_field(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "task: chat\n"))
    assert (err.line, err.key_path) == (4, "task")
    assert "add `messages_field: messages` under input" in err.fix


def test_warning_signal_must_fit_in_the_time_limit(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "resources: {time: 2}\n"
                             "resilience: {signal_seconds: 300}\n"))
    assert err.key_path == "resilience.signal_seconds" and "below 120" in err.fix


def test_profile_errors_point_into_the_profile_file(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("resources:\n  mem: 8G\nslurm:\n  launcher: srun\n  max_aray_size: 9\n")
    err = error_of(write_job(tmp_path, BASE + "cluster: ./site.yaml\n"))
    assert (err.file, err.line, err.key_path) == (str(profile), 5, "slurm.max_aray_size")
    assert "did you mean 'max_array_size'?" in err.fix


def test_missing_local_model_dir(tmp_path):
    err = error_of(write_job(tmp_path, BASE.replace("org/model", "./ckpt")))
    assert (err.line, err.key_path) == (2, "model.id")
    assert "hpcinfer download" in err.fix


def test_extra_sbatch_bare_flags(tmp_path):
    ok = load_job(write_job(tmp_path, BASE + "resources:\n  extra_sbatch: {exclusive: true, "
                            "mail-type: END, nice: 10}\n"))
    assert ok.resources.extra_sbatch == {"exclusive": True, "mail-type": "END", "nice": "10"}
    err = error_of(write_job(tmp_path, BASE + "resources:\n  extra_sbatch:\n    exclusive: false\n",
                             name="j2.yaml"))
    assert (err.line, err.key_path) == (6, "resources.extra_sbatch.exclusive")
    assert "remove the line" in err.fix


@pytest.mark.parametrize("value", ["[]", '""', '[a.jsonl, " "]'])
def test_input_path_must_name_something(tmp_path, value):
    err = error_of(write_job(tmp_path, f"name: t1\nmodel: {{id: org/m}}\ninput: {{path: {value}}}\n"))
    assert (err.line, err.key_path) == (3, "input.path") and "no input files" in err.problem


def test_non_text_values_get_a_quoting_fix(tmp_path):
    err = error_of(write_job(tmp_path, BASE + "env: {DEBUG: true}\n"))
    assert (err.key_path, err.fix) == ("env.DEBUG", 'quote it: `DEBUG: "true"`')
    err = error_of(write_job(tmp_path, BASE + "sampling: {stop: [a, {b: c}]}\n", name="j2.yaml"))
    assert err.key_path == "sampling.stop.1" and "not a block or list" in err.fix
