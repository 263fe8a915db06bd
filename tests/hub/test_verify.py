"""verify_snapshot: each kind of damage is caught and the message names the bad file."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hpcinfer.hub.errors import VerificationError
from hpcinfer.hub.verify import verify_snapshot
from hpcinfer.testing.fake_hub import tiny_checkpoint

SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def snapshot(tmp_path) -> Path:
    root = tmp_path / "snap"
    root.mkdir()
    for name, data in tiny_checkpoint().items():
        if not name.endswith(".bin"):
            (root / name).write_bytes(data)
    return root


def _sizes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.iterdir()}


def test_good_snapshot_passes(snapshot):
    result = verify_snapshot(snapshot, _sizes(snapshot))
    assert result.num_files == len(list(snapshot.iterdir()))
    assert result.size == sum(_sizes(snapshot).values())


def _fails(snapshot, *needles, expected=None, require_weights=True):
    with pytest.raises(VerificationError) as info:
        verify_snapshot(snapshot, expected, require_weights=require_weights)
    for needle in needles:
        assert needle in str(info.value)


def test_missing_shard_named_in_index(snapshot):
    (snapshot / SHARD2).unlink()
    _fails(snapshot, SHARD2, "missing", "model.safetensors.index.json")


def test_truncated_shard(snapshot):
    data = (snapshot / SHARD2).read_bytes()
    (snapshot / SHARD2).write_bytes(data[:-4])
    _fails(snapshot, SHARD2, "truncated")


def test_garbage_header(snapshot):
    (snapshot / SHARD2).write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    _fails(snapshot, SHARD2, "not valid JSON")
    (snapshot / SHARD2).write_bytes(b"\xff" * 64)
    _fails(snapshot, SHARD2, "header length")


def test_size_differs_from_hub(snapshot):
    sizes = _sizes(snapshot)
    sizes["tokenizer.json"] += 1
    _fails(snapshot, "tokenizer.json", f"the hub says {sizes['tokenizer.json']}", expected=sizes)


def test_dangling_cache_link(snapshot, tmp_path):
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "blobs" / "gone")
    _fails(snapshot, "tokenizer.json", "dangling")


def test_bad_config_and_no_weights(snapshot):
    (snapshot / "config.json").write_text("{")
    _fails(snapshot, "config.json", "not valid JSON")
    (snapshot / "config.json").write_text("{}")
    for shard in snapshot.glob("*.safetensors*"):
        shard.unlink()
    _fails(snapshot, "no weight files")
    assert verify_snapshot(snapshot, require_weights=False).num_files > 0


def test_not_a_directory(tmp_path):
    _fails(tmp_path / "nope", "nope", "not a directory")
