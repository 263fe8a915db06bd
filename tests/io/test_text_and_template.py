"""Text input (.txt, one prompt per line), input.prompt_template and output.text_field."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hpcinfer.io.formats import make_format
from hpcinfer.io.readers import ShardReader, count_text_rows
from hpcinfer.io.rows import BadRow, InputRow, InputSpec, OutputRecord


def _read(path, spec, start=0, stop=None):
    stop = count_text_rows(str(path)) if stop is None else stop
    return list(ShardReader(SimpleNamespace(file=path, start=start, stop=stop), spec))


def test_text_lines_are_rows_blank_lines_skipped_id_is_line_number(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\n\n   \nsecond line\r\nthird")
    assert count_text_rows(str(path)) == 3
    rows = _read(path, InputSpec())
    assert [(r.index, r.id, r.prompt) for r in rows] == [
        (0, 1, "first"), (1, 4, "second line"), (2, 5, "third")]
    # a shard in the middle counts non-blank lines, as the compiler did
    assert [r.prompt for r in _read(path, InputSpec(), 1, 3)] == ["second line", "third"]


def test_text_without_id_field_and_not_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")
    good, bad = _read(path, InputSpec(id_field=None))
    assert isinstance(good, InputRow) and good.key == f"{path}#0"
    assert isinstance(bad, BadRow) and bad.kind == "not_utf8" and "line 2" in bad.reason


def test_prompt_template_renders_columns_and_missing_column_is_a_bad_row(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "question": "why?"}\n{"id": 2, "q": "typo"}\n')
    spec = InputSpec(prompt_field=None, prompt_template="Question: {{ question }}\nAnswer:")
    good, bad = _read(path, spec, 0, 2)
    assert good.prompt == "Question: why?\nAnswer:"
    assert isinstance(bad, BadRow) and bad.kind == "template_error"
    assert "'question' is undefined" in bad.reason and "q" in bad.reason


def test_prompt_template_is_sandboxed(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "prompt": "x"}\n')
    [bad] = _read(path, InputSpec(prompt_template="{{ prompt.__class__.__mro__ }}"), 0, 1)
    assert isinstance(bad, BadRow) and "unsafe" in bad.reason


def test_template_columns_are_the_parquet_projection():
    spec = InputSpec(prompt_template="{{ a }} {{ b }}", passthrough=("c",))
    assert spec.columns() == ["id", "a", "b", "c"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_text_field_names_the_output_column(fmt):
    out_format = make_format(fmt, id_name="id", passthrough=("prompt",),
                             text_field="generated_text")
    row = InputRow(0, "f", 1, 1, prompt="p", passthrough={"prompt": "p"})
    record = out_format.record(row, OutputRecord("answer", 3, 1, "stop"))
    assert list(record) == ["row_index", "id", "prompt", "generated_text",
                            "num_prompt_tokens", "num_output_tokens", "finish_reason"]
    if fmt == "parquet":
        table = out_format.to_table([record])
        assert str(table.schema.field("generated_text").type) == "string"


def test_text_field_clash_with_a_passthrough_column_is_refused():
    with pytest.raises(ValueError, match="clashes"):
        make_format("jsonl", passthrough=("generated_text",), text_field="generated_text")
