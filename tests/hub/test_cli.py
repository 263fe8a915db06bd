"""add_hub_commands on a caller's own argparse parser, as hpcinfer/cli.py wires it."""
from __future__ import annotations

import argparse
import json

from hpcinfer.hub.cli import add_hub_commands
from hpcinfer.hub.record import ModelRecord, write_record
from hpcinfer.testing.fake_hub import tiny_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcinfer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("render")  # the main CLI's own commands sit beside ours
    add_hub_commands(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


def test_parses_download_options():
    args = _parser().parse_args(["download", "org/m", "--revision", "v1", "--include", "*.md",
                                 "--include", "*.txt", "--exclude", "tok*", "--cache-dir", "/c"])
    assert (args.model, args.revision, args.include, args.exclude, args.cache_dir) == \
        ("org/m", "v1", ["*.md", "*.txt"], ["tok*"], "/c")


def test_models_and_verify_model_handlers(tmp_path, capsys):
    cache = tmp_path / "cache"
    snap = cache / "models--org--m" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    files = {n: b for n, b in tiny_checkpoint().items() if not n.endswith((".bin", ".md")) and
             not n.startswith(".")}
    for name, data in files.items():
        (snap / name).write_bytes(data)
    write_record(ModelRecord(id="org/m", revision="main", commit="c" * 40, path=str(snap),
                             files={n: len(b) for n, b in files.items()},
                             size=sum(map(len, files.values())), downloaded_at="2026-01-01"), cache)

    assert _run(["models", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "org/m" in out and "c" * 12 in out and str(snap) in out
    assert _run(["models", "--json", "--cache-dir", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(snap)

    assert _run(["verify-model", "org/m", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {snap}")
    (snap / "config.json").write_text("{")
    assert _run(["verify-model", "org/m", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: is 1 bytes, the hub says" in err

    assert _run(["verify-model", "org/unknown", "--cache-dir", str(cache)]) == 2
    assert "run `hpcinfer download org/unknown` on the login node first" in capsys.readouterr().err
