"""`hpcinfer` command line (login side).

Every subcommand imports what it needs when it runs, so `hpcinfer --help` and `render` stay
fast on a slow login node; nothing here imports torch, transformers or triton. Expected
failures (bad config, bad input, Slurm refusing) print one line to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _load(args):
    import json
    import os
    from hpcinfer.config import load_job
    overrides = list(args.set or ())
    for text in overrides:
        if not text.partition("=")[0].strip() or "=" not in text:
            # Checked here too so the CLI says it in the words of its own flag, first.
            raise UserError(f"--set expects KEY=VALUE, got {text!r}: e.g. "
                            "--set resources.time=04:00:00")
    if getattr(args, "out", None):
        # The job dir is the output dir (DESIGN §5): --out DIR is --set output.dir=DIR, so
        # job.yaml and the worker agree on where results go. JSON quoting is valid YAML.
        overrides.append(f"output.dir={json.dumps(os.path.abspath(args.out))}")
    return load_job(args.job, overrides=tuple(overrides))


def _compile(args):
    from hpcinfer.compile.jobdir import compile_job
    return compile_job(_load(args), container_def=getattr(args, "container_def", False),
                       download=getattr(args, "download", False),
                       restart=getattr(args, "restart", False))


def cmd_validate(args) -> int:
    from hpcinfer.compile.compiler import build_plan
    from hpcinfer.compile.model import resolve_job_model
    from hpcinfer.compile.render import describe
    from hpcinfer.compile.inputs import check_unique_ids
    from hpcinfer.compile.sample import (DEFAULT_SAMPLE_ROWS, FULL_ID_CHECK_ROWS, sample_inputs,
                                         warnings_of)
    cfg = resolve_job_model(_load(args))
    plan = build_plan(cfg)
    # The id scan reads every row; past FULL_ID_CHECK_ROWS it waits for --full so validate
    # stays quick on big inputs (the worker refuses duplicate ids before it loads the model).
    check_ids = args.full or plan.total_rows <= FULL_ID_CHECK_ROWS
    if check_ids:
        check_unique_ids(cfg, plan.input_files)
    samples = sample_inputs(cfg, plan, None if args.full else DEFAULT_SAMPLE_ROWS)
    for line in warnings_of(cfg, samples):
        print(f"hpcinfer: warning: {line}", file=sys.stderr)
    from hpcinfer.compile.checkpoint import quantization_note
    note = quantization_note(cfg)
    if note:
        print(f"{args.job}: quantization: {note}")
    num_read = sum(s.num_rows for s in samples)
    print(f"{args.job}: ok: {describe(plan)}; read {num_read} rows "
          f"({'all' if args.full else f'first {DEFAULT_SAMPLE_ROWS} per file'}), "
          f"{sum(s.num_usable for s in samples)} usable"
          + ("" if check_ids else f"; ids of all {plan.total_rows} rows not checked for "
             "duplicates (--full does)"))
    return 0


def _write(args):
    from hpcinfer.compile.jobdir import write_job_dir
    from hpcinfer.compile.render import describe
    rendered = _compile(args)
    write_job_dir(rendered)
    print(f"job dir: {rendered.job_dir}")
    print(f"  {describe(rendered.plan)}")
    print(f"  files: {', '.join(name for name, _ in rendered.files)}, logs/, metrics/")
    return rendered


def cmd_render(args) -> int:
    import shlex
    rendered = _write(args)
    print(f"would submit: cd {shlex.quote(str(rendered.job_dir))} && sbatch submit.sbatch"
          "   (or: hpcinfer submit JOB)")
    return 0


def _require_sbatch() -> None:
    import shutil
    if shutil.which("sbatch") is None:
        raise UserError("no Slurm here (sbatch not on PATH): use `hpcinfer run JOB --local`")


def cmd_submit(args) -> int:
    from hpcinfer.slurm.slurm import submit_job_dir
    _require_sbatch()
    rendered = _write(args)
    job_id = submit_job_dir(rendered.job_dir)
    print(f"submitted job {job_id}; follow it with: hpcinfer status {rendered.job_dir}")
    return 0


def cmd_run(args) -> int:
    from hpcinfer.slurm.local import run_job_dir
    if not args.local:
        raise UserError("`hpcinfer run` needs --local for now (runs the job here, without "
                        "Slurm); use `hpcinfer submit JOB` to go through Slurm")
    rendered = _write(args)
    print(f"running locally (local backend, no Slurm): bash {rendered.script_path}")
    sys.stdout.flush()
    rc = run_job_dir(rendered.job_dir)
    print(f"local run {'finished' if rc == 0 else f'failed (exit {rc})'}; logs in "
          f"{rendered.job_dir / 'logs'}")
    return 0 if rc == 0 else 1


def cmd_status(args) -> int:
    import json
    from hpcinfer.slurm.status import format_status, gather
    info = gather(_job_dir(args.jobdir))
    print(json.dumps(info, indent=1) if args.json else format_status(info))
    return 0


def cmd_collect(args) -> int:
    from hpcinfer.io.collect import CollectError, collect
    try:
        result = collect(_job_dir(args.jobdir), format=args.format, single_file=args.single_file)
    except (CollectError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"collected {result.num_rows} rows and {result.num_errors} bad rows into "
          f"{', '.join(str(p) for p in result.files)}")
    if result.incomplete_shards:
        print(f"warning: shards not finished (no DONE): {', '.join(result.incomplete_shards)} "
              "(see `hpcinfer status`)", file=sys.stderr)
    if result.failure_message():     # a FAILED shard: never report the job as complete
        raise UserError(result.failure_message())
    return 0


def cmd_cancel(args) -> int:
    from hpcinfer.slurm.records import last_submission
    from hpcinfer.slurm.api import Job
    job_dir = _job_dir(args.jobdir)
    sub = last_submission(job_dir)
    if sub is None or sub["backend"] != "slurm":
        raise UserError(f"{args.jobdir} has no Slurm job to cancel (a local run stops with "
                        "Ctrl-C in its own terminal)")
    job = Job(job_dir)
    job.cancel()
    print(f"cancelled job {job.job_id}")
    return 0


def _job_dir(path: str):
    from pathlib import Path
    job_dir = Path(path)
    if not (job_dir / "plan.json").is_file():
        raise UserError(f"{path} is not a job dir (no plan.json): pass the directory "
                        "`hpcinfer render` or `submit` printed")
    return job_dir


def cmd_container_build(args) -> int:
    import shlex
    from pathlib import Path
    from hpcinfer.compile.container import ContainerError, build_image
    job_dir = Path(args.job)
    if not (job_dir / "plan.json").is_file():
        job_dir = _write(args).job_dir      # a job file: render it, the def goes in its job dir
    try:
        command, ran = build_image(job_dir, wheel=args.wheel and Path(args.wheel),
                                   image=args.image and Path(args.image))
    except ContainerError as exc:
        raise UserError(str(exc)) from None
    where = f"cd {shlex.quote(str(job_dir.absolute()))} && {shlex.join(command)}"
    if ran:
        print(f"built {command[-2]}; point container.image at it")
    else:
        print(f"no apptainer or singularity here: on a machine that has one and sees the same "
              f"paths (a build node, or after copying the job dir there), run:\n  {where}")
    return 0


def cmd_schema(args) -> int:
    import json
    from hpcinfer.config import json_schema
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_models_supported(args) -> int:
    """What the engine loads, from the same torch-free tables the engine reads."""
    import json
    from hpcinfer.models import support
    table = {"architectures": support.supported_architectures(),
             "pooling_architectures": support.supported_architectures(pooling=True),
             "rope_types": list(support.SUPPORTED_ROPE_TYPES),
             "quant_methods": list(support.SUPPORTED_QUANT_METHODS)}
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("generation (task generate, chat):\n  " + "\n  ".join(table["architectures"]))
    print("pooling (task embed, classify, score, reward):\n  "
          + "\n  ".join(table["pooling_architectures"]))
    print(f"rope types: {', '.join(table['rope_types'])}")
    print(f"quantization: {', '.join(table['quant_methods']) or 'none yet (unquantized only)'}")
    print("`hpcinfer validate JOB` checks a job's checkpoint (config.json) against these.")
    return 0


def cmd_convert_gguf(args) -> int:
    """A GGUF file as the checkpoint directory a job file can name (converted once, cached:
    hpcinfer/models/gguf.py). Imports transformers only here."""
    from pathlib import Path
    path = Path(args.file)
    if path.suffix != ".gguf" or not path.is_file():
        raise UserError(f"{path} is not a .gguf file: give the path of one")
    from hpcinfer.models.gguf import gguf_checkpoint
    try:
        print(gguf_checkpoint(path))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_init(args) -> int:
    from hpcinfer.config import init_text
    sys.stdout.write(init_text(args.cluster))
    return 0


HUB_COMMANDS = ("download", "models", "verify-model")


def _needs_hub_commands(argv: list[str] | None) -> bool:
    """False when argv names another command: the hub package (~50 ms to import) is then left
    out of the parser, which keeps `render` cold-start fast."""
    if argv is None:
        return True
    words = [a for a in argv if not a.startswith("-")]
    return not words or words[0] in HUB_COMMANDS or words[0] not in _COMMANDS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcinfer", description="Offline batch LLM inference on Slurm clusters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("job", metavar="JOB", help="job YAML file")
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                       help="override a config value (repeatable), e.g. --set resources.time=02:00:00")
        p.set_defaults(func=func)
        return p

    p = job_command("validate", cmd_validate, "check the config, the model's config.json and "
                    "the first rows of every input file; writes nothing")
    p.add_argument("--full", action="store_true", help="read every input row, not the first "
                   "100 of each file")
    for name, func, text in (("render", cmd_render, "write the job dir; print what would be submitted"),
                             ("submit", cmd_submit, "render, then sbatch; prints the job id"),
                             ("run", cmd_run, "render, then run the job here (--local)")):
        p = job_command(name, func, text)
        p.add_argument("--out", metavar="DIR",
                       help="job dir = output dir (same as --set output.dir=DIR)")
        p.add_argument("--container-def", action="store_true",
                       help="also write container.def (an Apptainer definition)")
        p.add_argument("--download", action="store_true",
                       help="download the model first when it is not downloaded yet")
        p.add_argument("--restart", action="store_true",
                       help="the job dir holds results of another config: move them to "
                       "JOBDIR/archive/<time>/ and start over")
        if name == "run":
            p.add_argument("--local", action="store_true", help="run without Slurm (local backend)")
    p = sub.add_parser("status", help="state of a job: per task and per shard rows done, "
                       "bad rows, throughput, ETA")
    p.add_argument("jobdir", metavar="JOBDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("collect", help="merge committed results into JOBDIR/outputs/, in "
                       "input order")
    p.add_argument("jobdir", metavar="JOBDIR")
    p.add_argument("--format", choices=("jsonl", "parquet", "openai-batch"),
                   help="output format (default: the job's output.format)")
    p.add_argument("--single-file", action="store_true",
                   help="one results file instead of one per shard")
    p.set_defaults(func=cmd_collect)
    p = sub.add_parser("cancel", help="scancel a submitted job (all its tasks)")
    p.add_argument("jobdir", metavar="JOBDIR")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("container", help="container images for jobs (Apptainer/Singularity)")
    build = p.add_subparsers(dest="container_command", required=True, metavar="ACTION")
    p = build.add_parser("build", help="write container.def for a job and build the image "
                         "(or print the command for a machine with apptainer)")
    p.add_argument("job", metavar="JOB", help="job dir (rendered) or job YAML file")
    p.add_argument("--wheel", metavar="PATH", help="hpcinfer wheel of this version (default: "
                   "built with `pip wheel --no-deps` into the job dir)")
    p.add_argument("--image", metavar="SIF", help="image to write (default: JOBDIR/hpcinfer-VERSION.sif)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="as for render")
    p.add_argument("--out", metavar="DIR", help="as for render")
    p.add_argument("--download", action="store_true", help="as for render")
    p.set_defaults(func=cmd_container_build, container_def=True)
    if _needs_hub_commands(argv):
        _add_hub_commands(sub)
    sub.add_parser("run-batch", add_help=False,
                   help="run an OpenAI batch file here, as `vllm run-batch -i IN -o OUT --model "
                   "ID` (same flags; see `hpcinfer run-batch --help`)")
    p = sub.add_parser("convert-gguf", help="convert a GGUF file once into a cached checkpoint "
                       "directory (printed) that model.id can name")
    p.add_argument("file", metavar="FILE.gguf")
    p.set_defaults(func=cmd_convert_gguf)
    p = sub.add_parser("schema", help="print the job file's JSON Schema")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("init", help="print an annotated starting job file")
    p.add_argument("--cluster", default="generic", help="cluster profile name")
    p.set_defaults(func=cmd_init)
    return parser


def _add_hub_commands(sub) -> None:
    from hpcinfer.hub.cli import add_hub_commands
    add_hub_commands(sub)      # download, models, verify-model (their own one-line errors)
    models = sub.choices["models"]
    models.add_argument("--supported", action="store_true",
                        help="list the architectures, rope types and quantization methods the "
                        "engine loads, instead of the downloaded models")
    list_downloads = models.get_default("handler")
    models.set_defaults(handler=lambda a: (cmd_models_supported if a.supported
                                           else list_downloads)(a))


# Every command but the hub's, for _needs_hub_commands.
_COMMANDS = ("validate", "render", "submit", "run", "status", "collect", "cancel", "container",
             "schema", "init", "run-batch", "convert-gguf")


def main(argv: list[str] | None = None) -> int:
    # pydantic looks for plugins the first time a model validates: it scans the entry points
    # of every installed distribution (slow on a cluster's shared Python on NFS) and imports
    # what it finds (logfire's adds ~100 ms). The CLI validates job files and needs none;
    # set PYDANTIC_DISABLE_PLUGINS= (empty) to have them anyway.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run-batch"]:   # vLLM's `vllm run-batch`: its own flags (compute side)
        from hpcinfer.entrypoints.openai.run_batch import main as run_batch
        return run_batch(argv[1:])
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="hpcinfer: %(message)s")
    try:
        return args.func(args) if hasattr(args, "func") else args.handler(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"hpcinfer: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors printed as one line and exit 2. Slurm's are raised only by
    hpcinfer.slurm.commands, so they are looked up only when that module ran: `render` and
    `validate` never import it (the 0.3 s budget)."""
    from hpcinfer.config.errors import ConfigError
    errors: tuple[type[Exception], ...] = (ConfigError, UserError)
    commands = sys.modules.get("hpcinfer.slurm.commands")
    if commands is not None:
        errors += (commands.SlurmError, commands.SlurmMissing)
    return errors


if __name__ == "__main__":
    sys.exit(main())
