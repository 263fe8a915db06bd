"""docs/vllm-compat.md's tables agree with the code: every EngineArgs flag with its status and
default, every SamplingParams field, and what each status does (logged / refused)."""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from hpcinfer.engine.arg_utils import EngineArgs, _field_specs
from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.vllm_args import IGNORED, REFUSED

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm-compat.md"


def _rows(section: str) -> list[list[str]]:
    text = DOC.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("| `")]


def _status(name: str) -> str:
    return "ignored" if name in IGNORED else "refused" if name in REFUSED else "supported"


def test_flag_table_matches_engine_args():
    documented = {row[0].strip("`"): row for row in _rows("Engine arguments")}
    specs = {"--" + name.replace("_", "-"): (name, default) for name, default, _, _ in _field_specs()}
    assert sorted(documented) == sorted(specs), "docs/vllm-compat.md's flag table is stale"
    for flag, (name, default) in specs.items():
        _, status, shown_default, _ = documented[flag]
        assert status == _status(name), flag
        assert shown_default == f"`{default!r}`", flag
    assert {f.name for f in dataclasses.fields(EngineArgs)} == {n for n, _ in specs.values()}


def test_sampling_table_matches_the_fields():
    documented = {row[0].strip("`"): row[1] for row in _rows("`SamplingParams` fields")}
    fields = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
    assert sorted(documented) == sorted(fields)
    for name, status in documented.items():
        if status == "refused":
            with pytest.raises(ValueError, match=rf"SamplingParams\.{name}=.*hpcinfer"):
                SamplingParams(**{name: 1})


def _non_default(default, kind):
    if kind is bool:
        return not default if default is not None else True
    if kind is int:
        return (default or 0) + 2
    if kind is float:
        return (default or 0) + 1.5
    if kind is str:
        return "something-else"
    return {"key": 1}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_arguments_name_the_feature(name):
    arg = REFUSED[name]
    EngineConfig.from_kwargs("m", **{name: arg.default})  # vLLM's default passes
    with pytest.raises(ValueError, match=re.escape(f"hpcinfer has no {arg.note}")):
        EngineConfig.from_kwargs("m", **{name: _non_default(arg.default, arg.kind)})


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_ignored_arguments_log_one_line(name, caplog):
    arg = IGNORED[name]
    with caplog.at_level(logging.INFO, logger="hpcinfer.engine.vllm_args"):
        EngineConfig.from_kwargs("m", **{name: arg.default})
        assert not caplog.records  # the default says nothing
        EngineConfig.from_kwargs("m", **{name: _non_default(arg.default, arg.kind)})
    assert len(caplog.records) == 1 and name in caplog.records[0].getMessage()
    assert "ignored" in caplog.records[0].getMessage()


def test_cli_namespace_and_engine_args_become_llm_kwargs(tmp_path):
    # the model is found at create_engine_config (a hub id would be resolved there): a dir
    from hpcinfer.utils import FlexibleArgumentParser
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path), "--max_num_seqs", "4", "-tp", "1",
                              "--no-enable-prefix-caching", "--pooler-config", '{"a": 1}'])
    assert args.max_num_seqs == 4 and args.enable_prefix_caching is False
    assert args.pooler_config == {"a": 1}
    config = EngineArgs.from_cli_args(args)
    config.pooler_config = None
    engine_config = config.create_engine_config()
    assert engine_config.max_num_seqs == 4 and not engine_config.enable_prefix_caching
    assert engine_config.block_size == 16  # None -> the engine's default
    with pytest.raises(ValueError, match="read by LLM, not LLMEngine"):
        EngineArgs(model=str(tmp_path), task="embed").create_engine_config()


def test_newer_examples_attention_backend_choice_imports_and_is_ignored(caplog):
    # vLLM's newer basic/embed.py and score.py import these and, on ROCm only, pass
    # attention_config=AttentionConfig(backend=AttentionBackendEnum.FLEX_ATTENTION).
    from hpcinfer.attention.backends.registry import AttentionBackendEnum
    from hpcinfer.config import AttentionConfig
    from hpcinfer.platforms import current_platform
    from hpcinfer.v1.attention.backends.registry import AttentionBackendEnum as V1Enum
    assert V1Enum is AttentionBackendEnum
    assert current_platform.is_rocm() is False and current_platform.is_cpu() is True
    chosen = AttentionConfig(backend=AttentionBackendEnum.FLEX_ATTENTION)
    with caplog.at_level(logging.INFO, logger="hpcinfer.engine.vllm_args"):
        config = EngineConfig.from_kwargs("m", attention_config=chosen)
    assert config.attention_backend == "auto"  # our own choice stands
    assert len(caplog.records) == 1 and "attention_config" in caplog.records[0].getMessage()
