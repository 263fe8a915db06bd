"""vLLM's OpenAI batch runner, same command line::

    python -m hpcinfer.entrypoints.openai.run_batch -i requests.jsonl -o results.jsonl \\
        --model meta-llama/Llama-3.1-8B-Instruct [engine flags as vLLM's]

It runs the request file as a local hpcinfer job (the OpenAI-batch job of docs/worker.md: the
task from the requests' urls, the engine flags mapped onto the job's model/engine/parallel
sections) in a job directory beside the output (``--job-dir``, default
``<output>.hpcinfer-job``), so a run that is killed or runs out of time resumes where it
stopped when the same command runs again, every request answered once. The output file is
vLLM's: one line per request in input order, answers as vLLM's server writes them, and a
request the engine cannot take as ``{"response": {"status_code": 400, ...}, "error": "..."}``
where vLLM puts its errors (the reason from the job's errors.jsonl).

Engine flags that a job file cannot express are refused with what to do; vLLM's flags that
change nothing here (logging, metrics server) are accepted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# EngineArgs field -> (job section, key) for the flags a job file expresses
JOB_KEYS = {"model": ("model", "id"), "max_model_len": ("model", "max_model_len"),
            "dtype": ("model", "dtype"), "tokenizer": ("model", "tokenizer"),
            "revision": ("model", "revision"), "hf_overrides": ("model", "hf_overrides"),
            "max_num_seqs": ("engine", "max_num_seqs"),
            "max_num_batched_tokens": ("engine", "max_num_batched_tokens"),
            "gpu_memory_utilization": ("engine", "gpu_memory_utilization"),
            "enable_prefix_caching": ("engine", "enable_prefix_caching"),
            "block_size": ("engine", "block_size"), "enforce_eager": ("engine", "enforce_eager"),
            "kv_cache_memory_bytes": ("engine", "kv_cache_memory_bytes"),
            "quantization": ("engine", "quantization"),
            "kv_cache_dtype": ("engine", "kv_cache_dtype"),
            "load_format": ("engine", "load_format"),
            "tensor_parallel_size": ("parallel", "tensor"),
            "pipeline_parallel_size": ("parallel", "pipeline"),
            "limit_mm_per_prompt": ("input", "limit_mm_per_prompt"),
            "mm_processor_kwargs": ("input", "mm_processor_kwargs")}
# run_batch's own flags that change nothing for a local file run
_ACCEPTED = {"output_tmp_dir", "max_log_len", "enable_metrics", "url", "port",
             "enable_prompt_tokens_details", "response_role"}
_TASK_OF_URL = {"/v1/chat/completions": "generate", "/v1/completions": "generate",
                "/v1/embeddings": "embed", "/v1/score": "score"}


def make_arg_parser(parser):
    """vLLM's run_batch flags, then EngineArgs' (as ``vllm.entrypoints.openai.run_batch``)."""
    from hpcinfer.engine.arg_utils import EngineArgs
    parser.add_argument("-i", "--input-file", required=True,
                        help="the request file (a local path: compute nodes have no network)")
    parser.add_argument("-o", "--output-file", required=True, help="the results file")
    parser.add_argument("--output-tmp-dir", default=None, help="accepted; unused (local files)")
    parser.add_argument("--response-role", default="assistant",
                        help="the answers' role; only 'assistant'")
    parser.add_argument("--job-dir", default=None,
                        help="hpcinfer: the job directory (default <output>.hpcinfer-job); "
                             "the same command again resumes there")
    parser.add_argument("--max-log-len", type=int, default=None, help="accepted; unused")
    parser.add_argument("--enable-metrics", action="store_true", help="accepted; unused")
    parser.add_argument("--url", default="0.0.0.0", help="accepted; unused")
    parser.add_argument("--port", type=int, default=8000, help="accepted; unused")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="accepted; unused")
    return EngineArgs.add_cli_args(parser)


def parse_args(argv=None):
    from hpcinfer.utils import FlexibleArgumentParser
    return make_arg_parser(FlexibleArgumentParser(
        description="hpcinfer's run of vLLM's OpenAI-compatible batch files")).parse_args(argv)


def task_of(input_file: Path) -> str:
    """The job task from the requests' urls (the first line with a known url decides; the
    worker reports lines whose url does not fit it as bad rows)."""
    with open(input_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                url = json.loads(line).get("url", "")
            except (ValueError, AttributeError):
                continue
            for suffix, task in _TASK_OF_URL.items():
                if url == suffix or (task == "score" and str(url).endswith("/score")):
                    return task
    raise SystemExit(f"run_batch: no request in {input_file} has a url hpcinfer serves "
                     f"({', '.join(_TASK_OF_URL)}): check the file")


def job_config(args, task: str, device: str) -> dict:
    """The job file of this run (a dict)."""
    from hpcinfer.engine.arg_utils import EngineArgs
    if args.response_role != "assistant":
        raise SystemExit(f"run_batch: --response-role {args.response_role!r}: answers are "
                         "written with role 'assistant' only")
    defaults = EngineArgs()
    config = {"name": "run-batch", "cluster": "generic", "task": task,
              "model": {}, "engine": {}, "parallel": {},
              "input": {"path": str(Path(args.input_file).resolve()), "format": "openai-batch",
                        "shard_rows": 1_000_000},
              "output": {"dir": str(Path(args.job_dir).resolve()), "format": "openai-batch"},
              "resources": {"device": device, "time": "7-00:00:00"}}
    refused = []
    for name in vars(defaults):
        value = getattr(args, name, getattr(defaults, name))
        if name in JOB_KEYS:
            if value is not None and (name == "model" or value != getattr(defaults, name)):
                if name in ("model", "tokenizer") and os.path.isdir(os.path.expanduser(value)):
                    value = str(Path(value).expanduser().resolve())  # the job file is elsewhere
                section, key = JOB_KEYS[name]
                config[section][key] = value
        elif value is not None and value != getattr(defaults, name) and not _ignored(name):
            refused.append(f"--{name.replace('_', '-')}")
    if refused:
        raise SystemExit(f"run_batch: {', '.join(refused)} cannot be given here; write a job "
                         "file instead (docs/worker.md: `hpcinfer run JOB --local`), whose "
                         "sections take the rest")
    if task != "generate":
        config["input"].pop("limit_mm_per_prompt", None)
    return {k: v for k, v in config.items() if v != {}}


def _ignored(name: str) -> bool:
    from hpcinfer.engine.vllm_args import IGNORED
    return name in IGNORED or name in ("seed", "device", "trust_remote_code", "attention_backend",
                                       "async_scheduling")


def write_output(job_dir: Path, input_file: Path, output_file: Path) -> tuple[int, int]:
    """Collect the job into vLLM's output file: answers and error lines in input order.
    Returns (answered, errors)."""
    from hpcinfer.io.atomic import atomic_write_bytes
    from hpcinfer.io.collect import collect
    result = collect(job_dir, single_file=True)
    answers: dict[str, str] = {}
    for path in result.files:
        if path.name.endswith(".openai.jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                answers[json.loads(line)["custom_id"]] = line
    errors = {}
    errors_file = job_dir / "outputs" / "errors.jsonl"
    if errors_file.is_file():
        for line in errors_file.read_text(encoding="utf-8").splitlines():
            error = json.loads(line)
            errors[error["row_index"]] = error
    lines, num_errors = [], 0
    with open(input_file, encoding="utf-8", errors="replace") as f:
        for index, line in enumerate(f):
            if index in errors:
                lines.append(_error_line(errors[index]))
                num_errors += 1
                continue
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if custom_id in answers:
                lines.append(answers.pop(custom_id))
    atomic_write_bytes(output_file, "".join(line + "\n" for line in lines).encode())
    return len(lines) - num_errors, num_errors


def _error_line(error: dict) -> str:
    """vLLM's BatchRequestOutput for a request it could not serve (status 400)."""
    digest = hashlib.sha256(f"{error.get('id')}:{error['row_index']}".encode()).hexdigest()
    return json.dumps({"id": f"batch_req_{digest[:24]}", "custom_id": error.get("id"),
                       "response": {"status_code": 400, "request_id": f"req_{digest[24:48]}",
                                    "body": None},
                       "error": f"{error['kind']}: {error['reason']}"}, ensure_ascii=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    for flag, value in (("-i", args.input_file), ("-o", args.output_file)):
        if str(value).startswith(("http://", "https://")):
            raise SystemExit(f"run_batch: {flag} {value}: URLs are not fetched here (compute "
                             "nodes have no network); copy the file to a local path")
    input_file, output_file = Path(args.input_file).resolve(), Path(args.output_file).resolve()
    if not input_file.is_file():
        raise SystemExit(f"run_batch: -i {args.input_file}: no such file")
    args.job_dir = args.job_dir or f"{output_file}.hpcinfer-job"
    # --device (EngineArgs'): cuda or cpu; anything else: cuda when a GPU is visible
    from hpcinfer.engine.model_runner import resolve_device
    device = args.device if args.device in ("cuda", "cpu") else resolve_device("auto").type
    config = job_config(args, task_of(input_file), device)
    job_dir = Path(args.job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / "run-batch.yaml"
    import yaml
    job_file.write_text(yaml.safe_dump(config, sort_keys=False))
    from hpcinfer.compile.jobdir import compile_job, write_job_dir
    from hpcinfer.config import ConfigError, load_job
    from hpcinfer.hub.offline import is_offline
    from hpcinfer.slurm.local import run_job_dir
    try:
        rendered = compile_job(load_job(job_file), job_dir=str(job_dir),
                               download=not is_offline())
    except ConfigError as e:
        raise SystemExit(f"run_batch: {e}") from None
    write_job_dir(rendered)
    print(f"run_batch: {input_file} as a local hpcinfer job in {job_dir}", flush=True)
    rc = run_job_dir(rendered.job_dir)
    if rc != 0:
        print(f"run_batch: the job failed (exit {rc}); logs in {job_dir / 'logs'}; run the "
              "same command again to resume", file=sys.stderr)
        return 1
    answered, errors = write_output(job_dir, input_file, output_file)
    print(f"run_batch: {answered} answers and {errors} errors written to {output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
