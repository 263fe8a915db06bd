"""The `download`, `models` and `verify-model` sub-commands, ready to hang on the main parser.

    from hpcinfer.hub.cli import add_hub_commands
    add_hub_commands(subparsers)          # subparsers = parser.add_subparsers(...)
    args = parser.parse_args()
    sys.exit(args.handler(args))          # each handler returns the exit code

Handlers print one line on stderr and return 2 for every HubError (gated model, missing
download, failed verification, network); Ctrl-C during a download exits 130 at once, saying how
to resume. `python -m hpcinfer.hub.cli ...` runs the same commands standalone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from hpcinfer.hub.errors import EXIT_CODE, HubError

log = logging.getLogger(__name__)


def add_hub_commands(subparsers) -> None:
    """Add `download`, `models`, `verify-model`; each sets `handler` (args -> exit code)."""
    p = subparsers.add_parser("download", help="download a model on the login node (pins the commit)",
                              description="Download a model's weights (safetensors, one copy), "
                              "config and tokenizer into the HF cache, verify it and record the "
                              "pinned commit for `render`. Re-run to resume. With --adapter, a "
                              "PEFT LoRA adapter; with --job, everything a job file names on the "
                              "hub (model, tokenizer, lora.adapters).")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="hub id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--adapter", action="store_true",
                   help="MODEL is a PEFT LoRA adapter: fetch adapter_config.json and "
                        "adapter_model.safetensors only")
    p.add_argument("--job", metavar="JOB_FILE",
                   help="download the job's hub model, tokenizer and lora.adapters (local "
                        "directories are left alone)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="also download repo files matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip repo files matching this glob (repeatable, applied last)")
    _add_cache_dir(p)
    p.set_defaults(handler=_guarded(run_download))

    p = subparsers.add_parser("models", help="list downloaded models (id, commit, size, path)")
    p.add_argument("--json", action="store_true", help="print the download records as JSON")
    _add_cache_dir(p)
    p.set_defaults(handler=_guarded(run_models))

    p = subparsers.add_parser("verify-model", help="re-check a downloaded model or a local directory")
    p.add_argument("model", metavar="ID_OR_PATH")
    p.add_argument("--revision", help="which download of the model (default: the newest)")
    _add_cache_dir(p)
    p.set_defaults(handler=_guarded(run_verify))


def run_download(args: argparse.Namespace) -> int:
    from hpcinfer.hub.download import download_model

    if args.job:
        if args.model or args.adapter or args.include or args.exclude:
            raise HubError("--job downloads what the job file names: drop MODEL, --adapter, "
                           "--include and --exclude (or download one model without --job)")
        return run_download_job(args)
    if not args.model:
        raise HubError("give the hub id to download (`hpcinfer download ORG/NAME`), or a job "
                       "file (`hpcinfer download --job job.yaml`)")
    if args.adapter:
        if args.include or args.exclude:
            raise HubError("--adapter fetches the adapter's two files: drop --include/--exclude")
        from hpcinfer.hub.adapters import download_adapter
        with exit_at_once_on_interrupt(f"interrupted: run `hpcinfer download --adapter "
                                        f"{args.model}` again to resume"):
            _print_record(download_adapter(args.model, args.revision, args.cache_dir))
        return 0

    with exit_at_once_on_interrupt(f"interrupted: run `hpcinfer download {args.model}` again "
                                    f"to resume (finished files are kept)"):
        record = download_model(args.model, args.revision, args.include, args.exclude,
                                args.cache_dir)
    _print_record(record)
    return 0


def run_download_job(args: argparse.Namespace) -> int:
    """Everything the job file names by hub id: model.id, model.tokenizer, lora.adapters."""
    from hpcinfer.config import load_job
    from hpcinfer.config.errors import ConfigError
    from hpcinfer.hub.adapters import download_adapter, looks_like_hub_id
    from hpcinfer.hub.download import download_model
    try:
        # The environment checks would refuse hub adapters that are not downloaded yet.
        cfg = load_job(args.job, check_environment=False)
    except ConfigError as exc:
        raise HubError(str(exc)) from None
    models = [(cfg.model.id, cfg.model.revision), (cfg.model.tokenizer, None)]
    models = [(m, rev) for m, rev in models if m and not os.path.isabs(m)]
    adapters = sorted({v for v in cfg.lora.adapters.values() if looks_like_hub_id(v)})
    with exit_at_once_on_interrupt(f"interrupted: run `hpcinfer download --job {args.job}` "
                                    "again to resume (finished files are kept)"):
        for model_id, revision in dict.fromkeys(models):
            _print_record(download_model(model_id, revision, cache_dir=args.cache_dir))
        for adapter_id in adapters:
            _print_record(download_adapter(adapter_id, cache_dir=args.cache_dir))
    if not models and not adapters:
        sys.stdout.write(f"{args.job}: nothing to download (the model and the adapters are "
                         "local directories)\n")
    return 0


def _print_record(record) -> None:
    sys.stdout.write(f"{record.id} {record.revision} -> commit {record.commit}: "
                     f"{len(record.files)} files, {_human(record.size)} in {record.path}\n")


def run_models(args: argparse.Namespace) -> int:
    from hpcinfer.hub.record import read_records

    records = read_records(cache_dir=args.cache_dir)
    if args.json:
        sys.stdout.write(json.dumps([r.to_json() for r in records], indent=2) + "\n")
        return 0
    if not records:
        sys.stdout.write("no models downloaded yet: run `hpcinfer download ID`\n")
        return 0
    rows = [("ID", "REVISION", "COMMIT", "SIZE", "DOWNLOADED", "PATH")]
    rows += [(r.id, r.revision, r.commit[:12], _human(r.size), r.downloaded_at, r.path)
             for r in sorted(records, key=lambda r: (r.id, r.revision))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] + "\n")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from hpcinfer.hub.errors import ModelNotDownloaded
    from hpcinfer.hub.record import find_record
    from hpcinfer.hub.verify import verify_snapshot

    if os.path.isdir(args.model):
        result = verify_snapshot(args.model)
    else:
        record = find_record(args.model, args.revision, args.cache_dir)
        if record is None:
            raise ModelNotDownloaded(args.model, args.revision)
        patterns = record.patterns or {}
        result = verify_snapshot(record.path, record.files,
                                 require_weights=not (patterns.get("include") or patterns.get("exclude")))
    sys.stdout.write(f"ok: {result.path} ({result.num_files} files, {_human(result.size)})\n")
    return 0


@contextlib.contextmanager
def exit_at_once_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C / SIGTERM during a download: say how to resume and exit now.

    huggingface_hub downloads in a thread pool; a KeyboardInterrupt would wait for every file in
    flight to finish (minutes for a large shard). Finished files are already renamed into the
    cache; the partial temp files left behind are cleaned up by a later download.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        _say(message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="HF hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub)")


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except HubError as exc:
            _say(f"error: {exc}")
            return EXIT_CODE
    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _say(line: str) -> None:
    # One line on stderr, newlines folded so the message stays one line in Slurm logs.
    sys.stderr.write(" ".join(line.split()) + "\n")


def _human(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size, unit = num_bytes / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpcinfer")
    add_hub_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
