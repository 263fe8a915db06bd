"""Whole-config rules that one field cannot check, each raising a ConfigError at the right line.

``check_consistency`` is pure (runs on every load, resolved job.yaml included).
``check_environment`` looks at the filesystem and the login shell but never at the input data
(globs and row counts are the compiler's): output dir, container image, account, model dir.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from hpcinfer.config import units
from hpcinfer.config.lora_checks import check_lora_adapters, check_lora_consistency
from hpcinfer.config.schema import ENV_NAME, MANAGED_SBATCH, JobConfig

log = logging.getLogger(__name__)

_SBATCH_FLAG = re.compile(r"^[a-z][a-z0-9-]*$")
# sbatch reads these when --account is not given, so they satisfy requires_account.
ACCOUNT_ENV = ("SBATCH_ACCOUNT", "SLURM_ACCOUNT")


def check_consistency(cfg: JobConfig) -> None:
    _check_layout(cfg)
    _check_task_fields(cfg)
    _check_prompt_template(cfg)
    _check_output_columns(cfg)
    _check_pooling(cfg)
    _check_sampling(cfg)
    _check_env_names(cfg)
    _check_extra_sbatch(cfg)
    _check_signal_time(cfg)
    _check_image_keys(cfg)
    check_lora_consistency(cfg)


def check_environment(cfg: JobConfig) -> None:
    _check_placeholders(cfg)
    _check_output_dir(cfg)
    _check_container(cfg)
    _check_account(cfg)
    _check_model_dir(cfg)
    _check_media(cfg)
    check_lora_adapters(cfg)
    _note_missing_env(cfg)


def _check_layout(cfg: JobConfig) -> None:
    """One replica is tensor x pipeline ranks; a task runs whole replicas (worker/ranks.py):
    on GPU nodes x gpus_per_node / (tensor x pipeline) of them, on CPU parallel.replicas."""
    tp, pp, nodes = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.nodes
    ranks = tp * pp
    if cfg.resources.device == "cpu":
        replicas = cfg.parallel.replicas
        if ranks * replicas % nodes:
            raise cfg.error_at("parallel.nodes",
                               f"tensor ({tp}) x pipeline ({pp}) x replicas ({replicas}) = "
                               f"{ranks * replicas} ranks do not split evenly over {nodes} "
                               "nodes",
                               f"write nodes: 1, or a tensor x pipeline x replicas that {nodes} "
                               "divides")
        return
    gpus = cfg.resources.gpus_per_node
    if (gpus * nodes) % ranks:
        divisors = [d for d in range(1, gpus * nodes + 1) if (gpus * nodes) % d == 0]
        per_node = f", or gpus_per_node: {ranks // nodes} under resources" \
            if ranks % nodes == 0 else ""
        raise cfg.error_at("parallel",
                           f"tensor ({tp}) x pipeline ({pp}) = {ranks} ranks per replica, which "
                           f"does not divide gpus_per_node ({gpus}) x nodes ({nodes}) = "
                           f"{gpus * nodes} GPUs",
                           f"make tensor x pipeline one of {divisors} under parallel (the "
                           f"quotient is the number of data-parallel replicas){per_node}")
    if gpus % tp:
        raise cfg.error_at("parallel.tensor",
                           f"tensor ({tp}) does not divide gpus_per_node ({gpus}): a tensor-"
                           f"parallel group must sit inside one node",
                           "use pipeline stages across nodes and tensor within a node")


def _check_task_fields(cfg: JobConfig) -> None:
    if cfg.input.format == "openai-batch":
        return  # rows carry their own body (prompt/messages/input)
    needed = {"generate": ("prompt_field",), "chat": ("messages_field",),
              "embed": ("text_field",), "classify": ("text_field",), "reward": ("text_field",),
              "score": ("text_1_field", "text_2_field")}[cfg.task]
    for field in needed:
        if field in ("prompt_field", "text_field") and cfg.input.prompt_template is not None:
            continue        # the template makes the prompt from the columns it names
        if getattr(cfg.input, field) is None:
            example = {"messages_field": "messages", "prompt_field": "prompt"}.get(field, "text")
            raise cfg.error_at(f"input.{field}" if f"input.{field}" in cfg._origins else "task",
                               f"task {cfg.task} reads input.{field}, which is not set",
                               f"add `{field}: {example}` under input (the column name)")


TEMPLATE_TASKS = ("generate", "embed", "classify", "reward")


def _check_prompt_template(cfg: JobConfig) -> None:
    """Syntax only (and the task): ``hpcinfer validate`` renders it over sampled rows too."""
    template = cfg.input.prompt_template
    if template is None:
        return
    if cfg.task not in TEMPLATE_TASKS or cfg.input.format == "openai-batch":
        raise cfg.error_at("input.prompt_template",
                           f"a prompt template makes one text per row, which task {cfg.task}"
                           f"{' with OpenAI batch input' if cfg.input.format == 'openai-batch' else ''}"
                           " does not read",
                           f"remove it, or use it with task {' | '.join(TEMPLATE_TASKS)} and "
                           "jsonl/parquet/text input")
    from hpcinfer.io.template import TemplateError, compile_template
    try:
        compile_template(template)
    except TemplateError as exc:
        raise cfg.error_at("input.prompt_template", str(exc),
                           'write Jinja2 over the row\'s columns, e.g. "Question: '
                           '{{ question }}\\nAnswer:"') from None


def _check_output_columns(cfg: JobConfig) -> None:
    if cfg.task in POOLING_TASKS or cfg.output.format == "openai-batch":
        return      # their records have no text column (io/formats.py)
    name = cfg.output.text_field
    if not name.strip():
        raise cfg.error_at("output.text_field", "the output column name is empty",
                           "write e.g. `text_field: generated_text` under output")
    reserved = {"row_index", "num_prompt_tokens", "num_output_tokens", "finish_reason",
                "logprobs", "prompt_logprobs"}
    taken = reserved | set(cfg.input.passthrough) | {cfg.input.id_field}
    if name in taken:
        raise cfg.error_at("output.text_field", f"{name!r} is already an output column (the id, "
                           "a passthrough column, or one of hpcinfer's own)",
                           "pick another name, e.g. generated_text")


POOLING_TASKS = ("embed", "classify", "score", "reward")
OPENAI_POOLING_TASKS = {"embed": "/v1/embeddings", "score": "/v1/score"}
# pooling: key -> the tasks it applies to
POOLING_KEY_TASKS = {"pooling_type": ("embed",), "normalize": ("embed",),
                     "dimensions": ("embed",), "use_activation": ("classify", "score")}


def pooling_io_problem(task: str, input_format: str,
                       output_format: str) -> tuple[str, str, str] | None:
    """(key, problem, fix) when a pooling task cannot read/write these formats, else None.
    The worker checks the same (setup.check_supported) before it loads the model."""
    if task not in POOLING_TASKS:
        return None
    oai_in, oai_out = input_format == "openai-batch", output_format == "openai-batch"
    if (oai_in or oai_out) and task not in OPENAI_POOLING_TASKS:
        key = "input.format" if oai_in else "output.format"
        return (key, f"task {task} has no OpenAI batch url (vLLM's run-batch serves "
                     "/v1/embeddings for embed and /v1/score for score)",
                f"use jsonl or parquet for {key}" + (" with input.text_field" if oai_in else ""))
    if oai_out and not oai_in:
        return ("output.format", f"openai-batch answers OpenAI batch requests, but task "
                                 f"{task} reads {input_format} rows",
                "write `format: jsonl` (or parquet) under output, or give OpenAI batch input "
                f"({OPENAI_POOLING_TASKS[task]} lines) with input.format: openai-batch")
    if oai_in and not oai_out:
        return ("output.format", f"OpenAI batch input for task {task} is answered with OpenAI "
                                 "batch lines (one request may hold several inputs)",
                "write `format: openai-batch` under output")
    return None


def _check_pooling(cfg: JobConfig) -> None:
    problem = pooling_io_problem(cfg.task, cfg.input.format, cfg.output.format)
    if problem:
        raise cfg.error_at(*problem)
    for key, tasks in POOLING_KEY_TASKS.items():
        if getattr(cfg.pooling, key) is not None and cfg.task not in tasks:
            raise cfg.error_at(f"pooling.{key}", f"applies to task {' and '.join(tasks)} "
                               f"only, and this job's task is {cfg.task}",
                               f"remove {key} from the pooling block")


def _check_sampling(cfg: JobConfig) -> None:
    s = cfg.sampling
    if s.prompt_logprobs is not None and cfg.task in POOLING_TASKS:
        raise cfg.error_at("sampling.prompt_logprobs",
                           "prompt logprobs are written by generate/chat jobs only (this "
                           f"job: task {cfg.task})",
                           "remove prompt_logprobs, or use task generate")
    if s.min_tokens > s.max_tokens:
        raise cfg.error_at("sampling.min_tokens",
                           f"min_tokens ({s.min_tokens}) is above max_tokens ({s.max_tokens})",
                           f"write min_tokens <= {s.max_tokens}")
    if cfg.model.max_model_len is not None and s.max_tokens >= cfg.model.max_model_len:
        raise cfg.error_at("sampling.max_tokens",
                           f"max_tokens ({s.max_tokens}) leaves no room for a prompt in "
                           f"max_model_len ({cfg.model.max_model_len})",
                           "lower sampling.max_tokens or raise model.max_model_len")


def _check_env_names(cfg: JobConfig) -> None:
    blocks = [("env", cfg.env)]
    if cfg.container is not None:
        blocks.append(("container.env", cfg.container.env))
    for prefix, env in blocks:
        for name in env:
            if not ENV_NAME.match(name):
                raise cfg.error_at(f"{prefix}.{name}", f"{name!r} is not an environment "
                                   "variable name", "use letters, digits and '_', not starting "
                                   "with a digit")


def _check_extra_sbatch(cfg: JobConfig) -> None:
    for flag, value in cfg.resources.extra_sbatch.items():
        key_path = f"resources.extra_sbatch.{flag}"
        if value is False:
            raise cfg.error_at(key_path, f"{flag}: false does not turn an sbatch flag off",
                               "remove the line (true or null adds a bare flag)")
        bare = flag.lstrip("-")
        if not _SBATCH_FLAG.match(bare) or bare != flag:
            raise cfg.error_at(key_path, f"{flag!r} is not an sbatch long option name",
                               "write the name without dashes, e.g. `mail-type: END`")
        if bare in MANAGED_SBATCH:
            raise cfg.error_at(key_path, f"--{bare} is set by hpcinfer",
                               f"set {MANAGED_SBATCH[bare]} instead")


def _check_signal_time(cfg: JobConfig) -> None:
    limit_s = units.time_seconds(cfg.resources.time)
    if limit_s is not None and cfg.resilience.signal_seconds >= limit_s:
        raise cfg.error_at("resilience.signal_seconds",
                           f"the warning signal ({cfg.resilience.signal_seconds} s before the "
                           f"limit) would come before the job has run (time {cfg.resources.time})",
                           f"write signal_seconds below {limit_s}, or raise resources.time")


def _check_output_dir(cfg: JobConfig) -> None:
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise cfg.error_at("output.dir", f"{out} exists and is not a directory",
                           "choose another output.dir")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out else \
            f"cannot be created: {existing} is not writable"
        raise cfg.error_at("output.dir", f"output dir {out} {what}",
                           "choose a directory you can write, e.g. under $SCRATCH or $HOME")


def _check_container(cfg: JobConfig) -> None:
    if cfg.container is None:
        return
    image = cfg.container.image
    if "://" in image:
        if cfg.profile.offline_compute:
            raise cfg.error_at("container.image",
                               f"{image} would be pulled on a compute node, which is offline "
                               f"on cluster {cfg.cluster}",
                               f"pull it on the login node: `{cfg.container.runtime or 'apptainer'}"
                               f" pull hpcinfer.sif {image}` and set image: ./hpcinfer.sif")
        return
    if not Path(image).exists():
        raise cfg.error_at("container.image", f"container image {image} does not exist",
                           "build it (apptainer build hpcinfer.sif <def>), fix the path, or "
                           "write `container: null` to run without one")


# `hpcinfer init` writes CHANGE-ME where only the user knows the value; def-yourpi is what
# older init files and the Alliance docs' examples say.
PLACEHOLDER = re.compile(r"CHANGE[ _-]?ME")     # upper case only: prompts may say "change me"
OLD_PLACEHOLDERS = {"resources.account": ("def-yourpi",)}
PLACEHOLDER_HINTS = {
    "model.id": "a Hugging Face id (e.g. meta-llama/Llama-3.1-8B-Instruct; run `hpcinfer "
                "download ID` on the login node) or a checkpoint directory",
    "input.path": "your input files, e.g. data/*.jsonl (JSONL, Parquet or .txt, relative to "
                  "the job file)",
    "resources.account": "your Slurm allocation, e.g. def-<pi> or rrg-<pi> (yours: "
                         "`sshare -U -u $USER`)",
    "container.image": "an Apptainer/Singularity image (.sif) that exists",
}


def _check_placeholders(cfg: JobConfig) -> None:
    for key, value in _leaves(cfg.model_dump(mode="json")):
        if not isinstance(value, str):
            continue
        generic = key.rpartition(".")[0] if key.rpartition(".")[2].isdigit() else key
        if PLACEHOLDER.search(value) or value in OLD_PLACEHOLDERS.get(generic, ()):
            hint = PLACEHOLDER_HINTS.get(generic, "the value for your job")
            raise cfg.error_at(generic, f"{value!r} is a placeholder from `hpcinfer init`",
                               f"write {hint}")


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, node


def _check_account(cfg: JobConfig) -> None:
    if not cfg.profile.requires_account or cfg.resources.account:
        return
    if any(os.environ.get(name) for name in ACCOUNT_ENV):
        return  # sbatch picks it up from the environment
    raise cfg.error_at("resources", f"cluster {cfg.cluster} requires a Slurm account",
                       "add `account: def-<pi>` under resources (your allocations: "
                       "`sshare -U -u $USER`), or export SBATCH_ACCOUNT")


def _check_model_dir(cfg: JobConfig) -> None:
    for key in ("id", "tokenizer"):
        value = getattr(cfg.model, key)
        if not value or not os.path.isabs(value):
            continue
        path = Path(value)
        if path.suffix == ".gguf" and path.is_file():
            raise cfg.error_at(f"model.{key}", f"{value} is a GGUF file; a job file names a "
                               "checkpoint directory",
                               f"run `hpcinfer convert-gguf {value}` (once, here) and point "
                               f"model.{key} at the directory it prints")
        if not path.is_dir():
            raise cfg.error_at(f"model.{key}", f"model path {value} is not a directory",
                               f"run `hpcinfer download <hub id>` on a login node and point "
                               f"model.{key} at it, or fix the path")


def _check_image_keys(cfg: JobConfig) -> None:
    """input.image_field and input.mm_processor_kwargs_field: columns of task generate or
    chat (OpenAI batch rows carry image_url parts and body.mm_processor_kwargs instead);
    input.mm_processor_kwargs: tasks generate and chat."""
    for key, used in (("mm_processor_kwargs", bool(cfg.input.mm_processor_kwargs)),
                      ("mm_processor_kwargs_field",
                       cfg.input.mm_processor_kwargs_field is not None)):
        if used and cfg.task not in ("generate", "chat"):
            raise cfg.error_at(f"input.{key}", f"task {cfg.task} runs no image processor "
                               "(tasks generate and chat do)", f"remove input.{key}")
    if cfg.input.mm_processor_kwargs_field is not None and cfg.input.format == "openai-batch":
        raise cfg.error_at("input.mm_processor_kwargs_field", "OpenAI batch rows carry their "
                           "processor arguments in body.mm_processor_kwargs, not in a column",
                           "remove input.mm_processor_kwargs_field")
    if cfg.input.image_field is None:
        return
    if cfg.input.format == "openai-batch":
        raise cfg.error_at("input.image_field", "OpenAI batch rows carry their images in "
                           "image_url parts of body.messages, not in a column",
                           "remove input.image_field")
    if cfg.task not in ("generate", "chat"):
        raise cfg.error_at("input.image_field", f"task {cfg.task} does not read an image "
                           "column (tasks generate and chat do)",
                           "image columns feed vision-language generation only")


def _check_media(cfg: JobConfig) -> None:
    """media_dirs exist; image keys only for a vision-language model (its config.json has a
    vision_config), judged when the model is a local snapshot."""
    for i, directory in enumerate(cfg.input.media_dirs):
        if not Path(directory).is_dir():
            raise cfg.error_at(f"input.media_dirs.{i}", f"media dir {directory} is not a "
                               "directory", "fix the path (relative to the job file)")
    image_keys = [key for key, used in (
        ("input.image_field", cfg.input.image_field is not None),
        ("input.media_dirs", bool(cfg.input.media_dirs)),
        ("input.mm_processor_kwargs", bool(cfg.input.mm_processor_kwargs)),
        ("input.mm_processor_kwargs_field", cfg.input.mm_processor_kwargs_field is not None))
        if used]
    uses_images = bool(image_keys)
    config = Path(cfg.model.id) / "config.json" if os.path.isabs(cfg.model.id) else None
    if not uses_images or config is None or not config.is_file():
        return
    try:
        hf = json.loads(config.read_text())
    except (OSError, ValueError):
        return                           # the worker reports an unreadable config
    if cfg.model.hf_overrides:   # as the engine will load it (engine/hf_overrides.py)
        from hpcinfer.engine.hf_overrides import merge_overrides
        hf = merge_overrides(hf, cfg.model.hf_overrides)
    if "vision_config" not in hf:
        key = image_keys[0]
        arch = ", ".join(hf.get("architectures") or ["?"])
        raise cfg.error_at(key, f"model {cfg.model.id} ({arch}) takes no images",
                           "use a vision-language model (docs/vision.md) or remove the "
                           "image keys")


def _note_missing_env(cfg: JobConfig) -> None:
    for name in cfg.profile.env_from_environment:
        if name not in os.environ:
            log.info("%s is not set in this shell; the job will run without it", name)
