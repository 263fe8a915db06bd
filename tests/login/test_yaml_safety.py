"""YAML the loader refuses fast (issue 16 item 7): alias bombs, huge files, deep nesting.

Each must fail with one ConfigError line well under a second, never hang the login node.
"""
from __future__ import annotations

import time

import pytest

from hpcinfer.cli import main
from hpcinfer.config import ConfigError, load_job
from hpcinfer.config.yamlfile import MAX_YAML_BYTES
from hpcinfer.testing.jobs import MINIMAL_JOB as BASE
from hpcinfer.testing.jobs import write_job_text as write_job

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _timed_error(path, overrides=()) -> tuple[ConfigError, float]:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides)
    return info.value, time.perf_counter() - start


def test_billion_laughs_fails_in_under_a_second(tmp_path):
    assert len(BILLION_LAUGHS.splitlines()) == 9
    err, seconds = _timed_error(write_job(tmp_path, BILLION_LAUGHS))
    assert seconds < 1.0, f"took {seconds:.2f} s"
    assert "expands to more than" in err.problem and "aliases" in err.fix
    assert "\n" not in str(err)


def test_billion_laughs_through_the_cli_exits_2_fast(tmp_path, capsys):
    path = write_job(tmp_path, BILLION_LAUGHS)
    start = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - start < 1.0
    assert "billion laughs" in capsys.readouterr().err


def test_a_small_alias_is_still_fine(tmp_path):
    text = BASE + "sampling: &s {temperature: 0.5}\nenv: {A: x}\n"
    assert load_job(write_job(tmp_path, text)).sampling.temperature == 0.5


def test_alias_bomb_in_a_set_value(tmp_path):
    bomb = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [*{p}, *{p}, *{p}, *{p}, *{p}, "
                                                         f"*{p}, *{p}, *{p}, *{p}, *{p}]"
                                                         for p, c in zip("abcdefg", "bcdefgh")])
    bomb += "]"
    err, seconds = _timed_error(write_job(tmp_path, BASE), [f"env.X={bomb}"])
    assert seconds < 1.0 and "expands to more than" in err.problem


def test_huge_file_is_refused_before_parsing(tmp_path):
    path = write_job(tmp_path, BASE + "#" + "x" * MAX_YAML_BYTES + "\n")
    err, seconds = _timed_error(path)
    assert seconds < 1.0 and "KiB a job file may have" in err.problem


@pytest.mark.parametrize("depth, words", [(30, "nests deeper than"), (5000, "too deeply"),
                                          (MAX_YAML_BYTES // 2 - 100, "too deeply")])
def test_deep_nesting_is_refused(tmp_path, depth, words):
    path = write_job(tmp_path, BASE + "env: " + "[" * depth + "]" * depth + "\n")
    err, seconds = _timed_error(path)
    assert seconds < 1.0 and words in err.problem


def test_deep_block_nesting_is_refused(tmp_path):
    text = BASE + "env:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(400))
    err, seconds = _timed_error(write_job(tmp_path, text))
    assert seconds < 1.0 and "nest" in err.problem


def test_set_without_equals_says_key_value(tmp_path, capsys):
    assert main(["validate", str(write_job(tmp_path, BASE)), "--set", "resources.time"]) == 2
    err = capsys.readouterr().err
    assert "--set expects KEY=VALUE, got 'resources.time'" in err and len(err.splitlines()) == 1
