"""Resume ledger: temp cleanup, torn errors.jsonl, numbering, DONE and protocol violations."""
from __future__ import annotations

import json

import pytest

from hpcinfer.io import ledger
from hpcinfer.io.atomic import atomic_write_bytes
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import BadRow, InputRow, OutputRecord
from hpcinfer.io.writers import PartWriter


def _writer(shard_dir, **kw):
    state = ledger.recover(shard_dir)
    return state, PartWriter(shard_dir, make_format("jsonl", id_name="id"),
                             next_part=state.next_part, **kw)


def _add(writer, i):
    writer.add_result(InputRow(i, "f", i, i, prompt="p"), OutputRecord("t", 1, 1, "stop"))


def _bad(i):
    return BadRow(i, "f", None, "invalid_json", "line is not valid JSON", "{")


def test_recover_reads_done_rows_and_continues_numbering(tmp_path):
    d = ledger.shard_dir(tmp_path, 3)
    assert d == tmp_path / "shards" / "00003"
    state, w = _writer(d, commit_every_rows=2)
    assert state.done_indices == frozenset() and state.next_part == 0
    for i in range(5):
        _add(w, i)
        w.maybe_commit()
    w.add_error(_bad(5))
    w.commit()
    state, w = _writer(d)
    assert state.done_indices == frozenset(range(6))
    assert (state.num_results, state.num_errors, state.next_part) == (5, 1, 3)
    _add(w, 6)
    (path,) = w.commit()
    assert path.name == "part-000003.jsonl"


def test_recover_deletes_temps_and_repairs_a_torn_errors_line(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / ".tmp-part-000000.jsonl.123").write_text('{"row_index": 0}\n')
    (d / "errors.jsonl").write_bytes(
        json.dumps(_bad(1).to_record()).encode() + b"\n" + b'{"row_index": 2, "id": nu')
    state = ledger.recover(d)
    assert state.removed_temps == (".tmp-part-000000.jsonl.123",)
    assert state.done_indices == frozenset({1})
    assert (d / "errors.jsonl").read_bytes().endswith(b"\n")
    assert sorted(p.name for p in d.iterdir()) == ["errors.jsonl"]


def test_torn_errors_file_without_any_newline_is_emptied(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "errors.jsonl").write_bytes(b'{"row_ind' * 10000)   # longer than one scan block
    assert ledger.recover(d).done_indices == frozenset()
    assert (d / "errors.jsonl").read_bytes() == b""


def test_mark_done_checks_every_row_is_committed(tmp_path):
    d = tmp_path / "s"
    _, w = _writer(d)
    _add(w, 0)
    w.add_error(_bad(1))
    w.commit()
    with pytest.raises(ledger.LedgerError, match="2 of 3 rows"):
        ledger.mark_done(d, 3)
    assert not ledger.is_done(d)
    assert ledger.mark_done(d, 2) == {"num_rows": 2, "num_results": 1, "num_errors": 1}
    assert ledger.is_done(d)


def test_a_row_in_two_committed_files_is_a_protocol_error(tmp_path):
    d = tmp_path / "s"
    for number in (0, 1):
        _, w = _writer(d)
        w.next_part = number
        _add(w, 7)
        w.commit()
    with pytest.raises(ledger.LedgerError, match="repeats row 7"):
        ledger.recover(d)


def test_unreadable_committed_part_is_reported(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "part-000000.parquet").write_bytes(b"garbage")
    with pytest.raises(ledger.LedgerError, match="part-000000.parquet is unreadable"):
        ledger.recover(d)


def test_failed_commit_leaves_no_temp_and_no_part(tmp_path):
    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        from hpcinfer.io.atomic import atomic_write
        atomic_write(tmp_path / "part-000000.jsonl", explode)
    assert list(tmp_path.iterdir()) == []


def test_time_based_commit(tmp_path):
    now = [0.0]
    _, w = _writer(tmp_path / "s", commit_every_rows=1000, commit_every_s=5.0,
                   clock=lambda: now[0])
    _add(w, 0)
    assert not w.should_commit()
    now[0] = 5.0
    assert w.should_commit()
    assert len(w.maybe_commit()) == 1 and w.num_pending == 0
    now[0] = 20.0
    assert not w.should_commit()        # nothing pending: no empty parts


def test_mark_failed_and_atomic_bytes(tmp_path):
    ledger.mark_failed(tmp_path / "s", "cannot read input file x")
    assert json.loads((tmp_path / "s" / "FAILED").read_text()) == \
        {"reason": "cannot read input file x"}
    atomic_write_bytes(tmp_path / "x", b"1")
    assert (tmp_path / "x").read_bytes() == b"1"


def test_row_set_is_a_compact_exact_set():
    rows = ledger.RowSet()
    assert all(rows.add(i) for i in (5, 0, 1_000_003, 64))
    assert not rows.add(64)
    assert len(rows) == 4 and 1_000_003 in rows and 6 not in rows and 10**9 not in rows
    assert list(rows) == [0, 5, 64, 1_000_003]


@pytest.mark.parametrize("name", ["jsonl", "parquet"])
def test_progress_counts_and_done_clears_failed(tmp_path, name):
    d = tmp_path / "s"
    ledger.mark_failed(d, "cannot read input file x")
    w = PartWriter(d, make_format(name, id_name="id"), commit_every_rows=2)
    for i in range(5):
        _add(w, i)
        w.maybe_commit()
    w.add_error(_bad(5))
    w.commit()
    assert ledger.progress(d) == {"num_results": 5, "num_errors": 1, "num_parts": 3,
                                  "is_done": False, "failed_reason": "cannot read input file x"}
    ledger.mark_done(d, 6)
    got = ledger.progress(d)
    assert got["is_done"] and got["failed_reason"] is None
