"""The job-file schema: pydantic v2 models, frozen, unknown keys forbidden.

This module is the single source of every key's type, default and description: the loader
validates against it, ``json_schema()`` exports it, ``init_text()`` annotates a starting file
from it, and docs/config-reference.md is generated from it. Cross-field rules that need the
whole config (tensor x pipeline vs GPUs, task vs input fields) live in checks.py, where they
can point at the right line.

Field validators raise ``user_error(problem, fix)`` so the loader can print what to write.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      WithJsonSchema)
from pydantic_core import PydanticCustomError

from hpcinfer.config import units


def user_error(problem: str, fix: str) -> PydanticCustomError:
    """A validation error that carries the fix; the loader turns it into a ConfigError."""
    return PydanticCustomError("hpcinfer", "{problem}", {"problem": problem, "fix": fix})


def _slurm_time(value: Any) -> str:
    try:
        return units.normalize_time(value)
    except ValueError as exc:
        raise user_error(str(exc), units.TIME_FIX) from None


def _slurm_mem(value: Any) -> str:
    try:
        return units.normalize_mem(value)
    except ValueError as exc:
        raise user_error(str(exc), units.MEM_FIX) from None


def _one_or_many(value: Any) -> Any:
    # "a" and ["a", "b"] are both fine in YAML; the config always holds a tuple.
    return (value,) if isinstance(value, str) else value


def _signal_name(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().upper()
        return value[3:] if value.startswith("SIG") else value
    return value


SlurmTime = Annotated[str, BeforeValidator(_slurm_time), WithJsonSchema({
    "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}],
    "description": "Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or minutes"})]
SlurmMem = Annotated[str, BeforeValidator(_slurm_mem), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": "^[0-9]+[KMGTkmgt]?[Bb]?$"},
              {"type": "integer", "minimum": 1}],
    "description": "Slurm memory: 64G, 500M, 1T; a bare number is megabytes"})]
StrTuple = Annotated[tuple[str, ...], BeforeValidator(_one_or_many), WithJsonSchema({
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]
def _some_globs(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or any(not glob.strip() for glob in value):
        raise user_error("no input files given", 'write e.g. `path: "data/*.jsonl"` (a glob, '
                         "or a list of globs)")
    return value


InputGlobs = Annotated[StrTuple, AfterValidator(_some_globs)]
SignalName = Annotated[Literal["USR1", "USR2", "TERM", "INT", "HUP", "ALRM", "QUIT"],
                       BeforeValidator(_signal_name)]

NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TASKS = ("generate", "chat", "embed", "classify", "score", "reward")


class Section(BaseModel):
    """Base for every block: frozen after load, unknown keys are errors."""
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True,
                              validate_default=True)


def _mapping(name: str, of: str, example: str, description: str, non_empty: bool = False):
    """A dict field type that must be a mapping with string keys (``non_empty``: and hold
    one), else one error naming ``name`` with ``example`` as the fix."""
    def check(value: Any) -> Any:
        if (not isinstance(value, dict) or (non_empty and not value)
                or not all(isinstance(k, str) for k in value)):
            raise user_error(f"{name} must be a {'non-empty ' if non_empty else ''}mapping of "
                             f"{of}", f"write e.g. `{name}: {example}, or remove it")
        return value
    return Annotated[dict, BeforeValidator(check),
                     WithJsonSchema({"type": "object", "description": description})]


HfOverrides = _mapping("hf_overrides", "config.json keys to values",
                       "{rope_scaling: {rope_type: yarn, factor: 4.0, "
                       "original_max_position_embeddings: 32768}}`",
                       "config.json keys and their values", non_empty=True)


class ModelSection(Section):
    id: str = Field(
        description="Hugging Face model id (org/name) or a local checkpoint directory "
                    "(./path, ../path, /abs/path or ~/path; relative to the job file)")
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit); null = what "
                          "`hpcinfer download` pinned")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight and activation dtype; auto = the checkpoint's torch_dtype "
                            "(float32 checkpoints run in bfloat16 on GPU)")
    max_model_len: Optional[int] = Field(
        None, ge=1, description="Longest prompt + output in tokens; null = the model's "
                                "max_position_embeddings")
    tokenizer: Optional[str] = Field(
        None, description="Tokenizer id or directory when it differs from the model's")
    hf_overrides: Optional[HfOverrides] = Field(
        None, description="config.json keys merged over the checkpoint's own (nested mappings "
                          "key by key), as vLLM's hf_overrides: rope scaling, a longer "
                          "context, a causal LM as a reranker (docs/tasks/score.md); the "
                          "snapshot is not changed")
    source_id: Optional[str] = Field(
        None, description="Written by render: the hub id that model.id was resolved from "
                          "(model.id is then the downloaded snapshot dir, model.revision its "
                          "commit); leave it null")


def _bad_row_budget(value: Any) -> Any:
    # An int is a count, a float a fraction: 10 = ten rows, 0.1 = a tenth of the rows.
    fix = ("write a count of rows (e.g. 100, or 0 for none) or a fraction in (0, 1] "
           "(e.g. 0.05 for 5%)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise user_error(f"max_bad_rows must be a number, got {value!r}", fix)
    if isinstance(value, int) and value < 0:
        raise user_error(f"max_bad_rows {value} is negative", fix)
    if isinstance(value, float) and not 0 < value <= 1:
        raise user_error(f"max_bad_rows {value} is a fraction outside (0, 1]", fix)
    return value


BadRowBudget = Annotated[Union[int, float], BeforeValidator(_bad_row_budget), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0},
              {"type": "number", "exclusiveMinimum": 0, "maximum": 1}],
    "description": "a count of rows, or a fraction of the task's rows"})]


MmProcessorKwargs = _mapping("mm_processor_kwargs", "the processor's argument names to values",
                             "{min_pixels: 200704, max_pixels: 1003520}` (Qwen2-VL's image "
                             "size bounds)", "keyword arguments of the model's transformers "
                             "processor call, e.g. min_pixels / max_pixels for Qwen2-VL")


class InputSection(Section):
    path: InputGlobs = Field(
        description="Input file glob, or a list of globs (relative to the job file's directory)")
    format: Literal["auto", "jsonl", "parquet", "text", "openai-batch"] = Field(
        "auto", description="auto picks from the suffix (.jsonl/.json -> jsonl, .parquet, "
                            ".txt -> text: one prompt per line, blank lines skipped, the "
                            "prompt in column prompt_field and the line number in id_field)")
    id_field: Optional[str] = Field(
        "id", description="Column with a unique row id, used to resume without duplicates; "
                          "null = (file, row index)")
    prompt_field: Optional[str] = Field(
        "prompt", description="Column with the text prompt (task generate)")
    prompt_template: Optional[str] = Field(
        None, description="Jinja2 template over the row's columns that makes the prompt, "
                          "e.g. \"Question: {{ question }}\\nAnswer:\" (sandboxed; an unknown "
                          "column is a bad row); replaces prompt_field (generate) or "
                          "text_field (embed/classify/reward); null = the column as is")
    max_bad_rows: BadRowBudget = Field(
        0.05, description="Bad rows (errors.jsonl) a task may have before it stops and fails: "
                          "a count (0 = none) or a fraction of its rows in (0, 1]")
    messages_field: Optional[str] = Field(
        None, description="Column with OpenAI-style chat messages (task chat)")
    text_field: Optional[str] = Field(
        None, description="Column with the text to embed/classify/reward")
    text_1_field: Optional[str] = Field(None, description="First text column (task score)")
    text_2_field: Optional[str] = Field(None, description="Second text column (task score)")
    sampling_field: Optional[str] = Field(
        None, description="Column with a per-row dict of sampling overrides")
    adapter_field: Optional[str] = Field(
        None, description="Column naming each row's LoRA adapter (a key of lora.adapters; "
                          "null or empty = the base model); docs/lora.md")
    image_field: Optional[str] = Field(
        None, description="Column with each row's images (a vision-language model): Parquet "
                          "binary (encoded image bytes) or a list of them, or JSONL file paths "
                          "(relative to the input file's directory) or a list of them; task "
                          "generate: the prompt holds the model's placeholder once per image, "
                          "task chat: they fill the messages' {type: image} parts in order; "
                          "docs/vision.md")
    media_dirs: StrTuple = Field(
        (), description="The only directories local image files may come from (image "
                        "column paths, file:// and absolute paths in image_url parts), "
                        "checked after resolving .. and symlinks; relative to the job file. "
                        "Never the network: http(s) URLs are bad rows")
    limit_mm_per_prompt: dict[Literal["image"], Annotated[int, Field(ge=0)]] = Field(
        {}, description="Most images per row, as vLLM's limit_mm_per_prompt, e.g. "
                        "{image: 1}; more is a bad row (too_many_images); default 999")
    mm_processor_kwargs: MmProcessorKwargs = Field(
        {}, description="Arguments for the model's processor on every row with images, as "
                        "vLLM's mm_processor_kwargs, e.g. {min_pixels: 200704, max_pixels: "
                        "1003520} for Qwen2-VL (fewer or more tokens per image); "
                        "docs/vision.md")
    mm_processor_kwargs_field: Optional[str] = Field(
        None, description="Column with a per-row mapping of processor arguments (JSONL "
                          "object; Parquet struct, map or JSON string), merged over "
                          "input.mm_processor_kwargs key by key (null values keep the "
                          "job's); tasks generate and chat; docs/vision.md")
    passthrough: StrTuple = Field(
        (), description="Input columns copied unchanged to the output")
    shard_rows: int = Field(
        100000, ge=1, description="Rows per shard; each shard is one array task")


class OutputSection(Section):
    dir: Optional[str] = Field(
        None, description="Job directory (results, logs, job.yaml); relative to the job file; "
                          "null = results/<name>")
    format: Literal["jsonl", "parquet", "openai-batch"] = Field(
        "jsonl", description="Format of the committed part files")
    text_field: str = Field(
        "text", description="Output column of the generated text (jsonl/parquet), e.g. "
                            "generated_text")
    commit_every_rows: int = Field(1000, ge=1, description="Commit a part file every N rows")
    commit_every_s: float = Field(60.0, gt=0, description="... or every T seconds")
    logprobs: bool = Field(False, description="Write token logprobs to the output")


def _structured_outputs(value: Any) -> Any:
    from hpcinfer.io.constraints import check_structured_outputs, looks_like_json_text
    if not isinstance(value, dict):
        raise user_error("structured_outputs must be a mapping",
                         "write e.g. `structured_outputs: {json: schemas/answer.json}`")
    json_value = value.get("json")
    checked = value
    if isinstance(json_value, str) and not looks_like_json_text(json_value):
        checked = {**value, "json": {}}   # a schema file: read and checked at load (loader.py)
    problem = check_structured_outputs(checked)
    if problem:
        raise user_error(problem, "see docs/structured-outputs.md for the keys and forms")
    return value


StructuredOutputs = Annotated[dict, AfterValidator(_structured_outputs), WithJsonSchema({
    "type": "object", "description": "json | regex | choice | grammar | json_object, plus "
    "disable_any_whitespace (vLLM's StructuredOutputsParams)",
    "properties": {"json": {"anyOf": [{"type": "object"}, {"type": "string"},
                                      {"type": "boolean"}]},
                   "regex": {"type": "string"},
                   "choice": {"type": "array", "items": {"type": "string"}},
                   "grammar": {"type": "string"}, "json_object": {"type": "boolean"},
                   "disable_any_whitespace": {"type": "boolean"},
                   "disable_additional_properties": {"type": "boolean"},
                   "disable_fallback": {"type": "boolean"}},
    "additionalProperties": False})]


class SamplingSection(Section):
    n: int = Field(1, ge=1, description="Completions per prompt")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass")
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 = all")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens below min_p x the top one")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI presence penalty")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI frequency penalty")
    repetition_penalty: float = Field(1.0, gt=0, description="HF repetition penalty; 1 = off")
    max_tokens: int = Field(16, ge=1, description="Most new tokens per completion")
    min_tokens: int = Field(0, ge=0, description="Fewest new tokens before EOS/stop may end it")
    stop: StrTuple = Field((), description="Stop strings")
    stop_token_ids: tuple[int, ...] = Field((), description="Extra stop token ids")
    ignore_eos: bool = Field(False, description="Keep generating past EOS")
    seed: Optional[int] = Field(None, description="Per-request seed; null = nondeterministic")
    logprobs: Optional[int] = Field(
        None, ge=0, description="Top logprobs per output token; null = none")
    prompt_logprobs: Optional[int] = Field(
        None, ge=0, description="Top logprobs per prompt token, written as the "
                                "prompt_logprobs column (jsonl, parquet) or in each response "
                                "as vLLM's server puts them (openai-batch); null = none")
    skip_special_tokens: bool = Field(True, description="Drop special tokens when detokenizing")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string")
    structured_outputs: Optional[StructuredOutputs] = Field(
        None, description="Constrain every output: one of json (a schema inline, as JSON "
                          "text, or a schema file's path), regex, choice, grammar (EBNF), "
                          "json_object: true; rows may override it "
                          "(docs/structured-outputs.md)")


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


PoolingType = Annotated[Literal["CLS", "LAST", "MEAN"], BeforeValidator(_upper)]


class PoolingSection(Section):
    """vLLM's PoolerConfig names; null = the checkpoint's own setting."""
    pooling_type: Optional[PoolingType] = Field(
        None, description="embed: which token states make the vector (first token, last, "
                          "mean); null = the checkpoint's (sentence-transformers 1_Pooling, "
                          "else the model's default)")
    normalize: Optional[bool] = Field(
        None, description="embed: L2-normalize each embedding; null = the checkpoint's "
                          "(a sentence-transformers Normalize module, else true)")
    dimensions: Optional[int] = Field(
        None, ge=1, description="embed: keep the first N dimensions (Matryoshka models), then "
                                "normalize; null = all")
    use_activation: Optional[bool] = Field(
        None, description="classify, score: softmax / sigmoid over the logits; null = true")


class EngineSection(Section):
    max_num_seqs: int = Field(256, ge=1, description="Most sequences in one batch")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget per engine step")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory for weights + KV cache")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes")
    block_size: Literal[8, 16, 32, 64, 128] = Field(16, description="Tokens per KV block")
    kv_cache_memory_bytes: Optional[int] = Field(
        None, ge=1, description="Fixed KV cache size; overrides gpu_memory_utilization")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs")
    async_scheduling: bool = Field(
        True, description="Launch step N+1 before reading step N's tokens (hides the host's "
                          "per-step work; off under tensor/pipeline parallelism)")
    pipeline_micro_batches: Optional[int] = Field(
        None, ge=1, description="Micro-batches each step is cut into with parallel.pipeline > "
                                "1 (default: one per stage while each keeps enough tokens; "
                                "docs/multi-node.md)")
    quantization: Optional[Literal["fp8", "fbgemm_fp8", "compressed-tensors", "awq", "gptq",
                                   "bitsandbytes"]] = \
        Field(None, description="Weight quantization (default: the checkpoint's "
                                "quantization_config); fp8 on an unquantized checkpoint "
                                "quantizes it at load, bitsandbytes rounds it through nf4 "
                                "(docs/quantization.md)")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto", description="KV cache storage: auto (the model's dtype) or fp8 (e4m3, "
                            "per-tensor scale 1.0: twice the tokens of bf16; "
                            "docs/quantization.md)")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="auto/safetensors: read the checkpoint's weights; dummy: seeded "
                            "random weights built from config.json alone (benchmarks; the "
                            "output text is meaningless; docs/quantization.md)")


class LoRASection(Section):
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters by name: a local PEFT adapter "
                                          "directory (adapter_config.json + "
                                          "adapter_model.safetensors) or a hub id that "
                                          "`hpcinfer download --job` fetches; docs/lora.md")
    max_loras: Optional[int] = Field(
        None, ge=1, description="Adapters held at once (slots); null = all of them")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank accepted")


class ParallelSection(Section):
    tensor: int = Field(1, ge=1, description="Tensor-parallel ranks (within a node)")
    pipeline: int = Field(1, ge=1, description="Pipeline stages (across nodes)")
    nodes: int = Field(1, ge=1, description="Nodes per task")
    replicas: int = Field(
        1, ge=1, description="Data-parallel replicas per task on CPU (resources.device: cpu), "
                             "each of tensor x pipeline ranks; ignored on GPU, where there are "
                             "nodes x gpus_per_node / (tensor x pipeline)")


def _gpus(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise user_error(f"{value} GPUs per node",
                         "write 1 or more; for a CPU-only run write `device: cpu` under "
                         "resources")
    return value


# Flags the rendered script sets itself: extra_sbatch must not fight them.
MANAGED_SBATCH = {
    "job-name": "name", "output": "output.dir", "error": "output.dir", "array": "input.shard_rows",
    "time": "resources.time", "partition": "resources.partition",
    "account": "resources.account", "qos": "resources.qos", "nodes": "parallel.nodes",
    "ntasks": "parallel", "ntasks-per-node": "parallel", "gpus-per-node": "resources.gpus_per_node",
    "gres": "resources.gpus_per_node", "gpus": "resources.gpus_per_node",
    "cpus-per-task": "resources.cpus_per_task", "mem": "resources.mem",
    "constraint": "resources.constraint", "signal": "resilience.signal",
    "requeue": "resilience.max_requeues", "open-mode": "(always append)",
}


class ResourcesSection(Section):
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="cpu requests no GPUs and runs the worker on CPU")
    partition: Optional[str] = Field(None, description="Slurm partition (--partition)")
    account: Optional[str] = Field(None, description="Slurm account (--account)")
    qos: Optional[str] = Field(None, description="Slurm QOS (--qos)")
    time: SlurmTime = Field("01:00:00", description="Wall time per task (--time)")
    gpus_per_node: Annotated[int, BeforeValidator(_gpus)] = Field(
        1, description="GPUs per node (--gpus-per-node); ignored with device: cpu")
    gpu_type: Optional[str] = Field(
        None, description="GPU type, e.g. a100 (--gpus-per-node=TYPE:N)")
    cpus_per_task: int = Field(8, ge=1, description="CPU cores per task (--cpus-per-task)")
    mem: SlurmMem = Field("64G", description="Memory per node (--mem)")
    array_parallelism: Optional[int] = Field(
        None, ge=1, description="Most array tasks running at once (--array=...%N); null = no cap")
    constraint: Optional[str] = Field(None, description="Node features (--constraint)")
    extra_sbatch: dict[str, Union[str, bool, None]] = Field(
        default_factory=dict, description="Other #SBATCH flags: {flag-name: value}; "
                                          "true or null for a bare flag (exclusive: true)")


class ContainerSection(Section):
    image: str = Field(
        description="Apptainer/Singularity image (.sif or sandbox dir; relative to the job "
                    "file), or docker://... on clusters whose compute nodes are online")
    runtime: Optional[Literal["apptainer", "singularity"]] = Field(
        None, description="null = the cluster profile's container_runtime")
    binds: StrTuple = Field(
        (), description="Extra bind mounts, src[:dst[:opts]]; the job dir, inputs, model and "
                        "HF cache are bound already")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment set inside the container")
    cuda: Optional[str] = Field(
        None, description="CUDA version of the image `hpcinfer container build` makes, e.g. "
                          "12.4; null = the newest the cluster profile's cuda_driver supports")
    hpcinfer: Literal["image", "job-dir"] = Field(
        "image", description="Where the container's hpcinfer comes from: image = installed in "
                             "the image (`hpcinfer container build`); job-dir = render copies "
                             "this hpcinfer (same version) into JOBDIR/python and puts it on "
                             "PYTHONPATH, so any image with Python >= 3.10, torch and "
                             "transformers runs it (e.g. a site's vLLM image)")


class ResilienceSection(Section):
    signal: SignalName = Field("USR2", description="Warning signal before the time limit")
    signal_seconds: int = Field(
        120, ge=1, le=65535, description="Seconds before the limit the signal arrives")
    max_requeues: int = Field(5, ge=0, description="Requeues after a signal before giving up")
    on_bad_row: Literal["skip", "fail"] = Field(
        "skip", description="skip: record it in errors.jsonl and go on; fail: stop the task")
    on_long_prompt: Literal["error", "truncate"] = Field(
        "error", description="error: treat as a bad row; truncate: keep the prompt's tail")


SECTION_MODELS: dict[str, type[Section]] = {
    "model": ModelSection, "input": InputSection, "output": OutputSection,
    "sampling": SamplingSection, "pooling": PoolingSection, "engine": EngineSection,
    "parallel": ParallelSection,
    "resources": ResourcesSection, "container": ContainerSection,
    "resilience": ResilienceSection,
}


class ClusterProfile(Section):
    """The ``slurm:`` block of a cluster profile: facts about the site a job file cannot set."""
    max_array_size: int = Field(
        1001, ge=1, description="Site MaxArraySize (largest array index + 1)")
    mpi_plugin: Literal["pmix", "pmi2", "none"] = Field(
        "pmix", description="srun --mpi plugin for multi-rank tasks")
    launcher: Literal["srun", "mpirun"] = Field("srun", description="How ranks are started")
    requires_account: bool = Field(False, description="Jobs must name resources.account")
    modules: StrTuple = Field((), description="`module load` lines before the worker runs")
    container_modules: StrTuple = Field(
        (), description="More `module load` lines for jobs with a container only (e.g. "
                        "apptainer), after modules")
    offline_compute: bool = Field(
        False, description="Compute nodes have no internet (HF_HUB_OFFLINE and friends)")
    container_runtime: Literal["apptainer", "singularity"] = Field(
        "apptainer", description="Container command used when the job has a container")
    env_from_environment: StrTuple = Field(
        (), description="Variables passed from the submitting shell into the job, e.g. HF_TOKEN")
    shm_size: Optional[str] = Field(
        None, description="Size of /dev/shm in the container (NCCL), e.g. 16G; null = default")
    cuda_driver: Optional[str] = Field(
        None, description="NVIDIA driver version on the GPU nodes (nvidia-smi), e.g. 550.54.14; "
                          "picks the CUDA of the container image; null = CUDA 12.4")
    nccl_env: dict[str, str] = Field(
        default_factory=dict,
        description="NCCL settings for multi-rank GPU jobs at this site, e.g. "
                    "{NCCL_SOCKET_IFNAME: ib0} or {NCCL_IB_DISABLE: '1'}; added to "
                    "hpcinfer's own NCCL_DEBUG=WARN and TORCH_NCCL_ASYNC_ERROR_HANDLING=1; "
                    "the job's env: wins")


class JobConfig(Section):
    """A validated job: profile defaults < job file < --set overrides, paths absolute.

    Build it with ``load_job`` or ``load_resolved``; ``profile`` is the merged cluster profile's
    ``slurm:`` block and ``location_of``/``error_at`` point later errors (e.g. an input glob
    that matches nothing) at the right file:line.
    """
    name: str = Field(pattern=NAME_PATTERN,
                      description="Job name: letters, digits, '.', '_', '-' (Slurm job name)")
    cluster: str = Field("generic", description="Cluster profile name, or a path to a "
                                                "profile YAML")
    task: Literal["generate", "chat", "embed", "classify", "score", "reward"] = Field(
        "generate", description="What to compute for each row")
    model: ModelSection = Field(description="The checkpoint")
    input: InputSection = Field(description="Where the rows come from")
    output: OutputSection = Field(default_factory=OutputSection,
                                  description="Where results go")
    sampling: SamplingSection = Field(default_factory=SamplingSection,
                                      description="Default sampling parameters (vLLM names)")
    pooling: PoolingSection = Field(default_factory=PoolingSection,
                                    description="Pooling options of embed/classify/score "
                                                "(vLLM's PoolerConfig)")
    engine: EngineSection = Field(default_factory=EngineSection,
                                  description="Engine batch and memory settings")
    lora: LoRASection = Field(default_factory=LoRASection,
                              description="LoRA adapters rows may name (task generate/chat)")
    parallel: ParallelSection = Field(default_factory=ParallelSection,
                                      description="Tensor/pipeline parallel layout")
    resources: ResourcesSection = Field(default_factory=ResourcesSection,
                                        description="What each Slurm task asks for")
    container: Optional[ContainerSection] = Field(
        None, description="Run the worker in a container; null = the Python env that "
                          "submitted")
    resilience: ResilienceSection = Field(default_factory=ResilienceSection,
                                          description="Signals, requeue and bad rows")
    env: dict[str, str] = Field(default_factory=dict,
                                description="Extra environment for the job (values are data)")

    _profile: Optional[ClusterProfile] = PrivateAttr(None)
    _origins: dict = PrivateAttr(default_factory=dict)
    _source: Optional[str] = PrivateAttr(None)
    _profile_source: Optional[str] = PrivateAttr(None)
    _overrides: tuple = PrivateAttr(())

    # The loader-facing API lives in loader.py; these are thin accessors for the compiler.
    @property
    def profile(self) -> ClusterProfile:
        """The merged cluster profile's ``slurm:`` block."""
        if self._profile is None:
            raise RuntimeError("JobConfig built without a profile: use load_job/load_resolved")
        return self._profile

    @property
    def source_file(self) -> Optional[str]:
        """Absolute path of the job file this config was loaded from."""
        return self._source

    @property
    def profile_file(self) -> Optional[str]:
        """Absolute path (or package resource) of the cluster profile that was merged in."""
        return self._profile_source

    @property
    def overrides(self) -> tuple[str, ...]:
        """The ``--set`` overrides applied on top of the job file, in order."""
        return self._overrides

    @property
    def ranks_per_node(self) -> int:
        """Worker processes per node: one per GPU, or tensor x pipeline x replicas / nodes
        on CPU."""
        if self.resources.device == "cpu":
            p = self.parallel
            return max(1, p.tensor * p.pipeline * p.replicas // p.nodes)
        return self.resources.gpus_per_node

    def location_of(self, key_path: str) -> tuple[str, Optional[int]]:
        """(file, line) where ``key_path`` (e.g. "input.path") was set, or its nearest parent."""
        from hpcinfer.config.loader import locate
        return locate(self._origins, key_path, self._source or "<config>")

    def error_at(self, key_path: str, problem: str, fix: str = ""):
        """A ConfigError pointing at where ``key_path`` was set (raise it yourself)."""
        from hpcinfer.config.errors import ConfigError
        file, line = self.location_of(key_path)
        return ConfigError(file, line, key_path, problem, fix)

    def to_yaml(self) -> str:
        """The fully resolved config (with the profile's slurm block), deterministic order."""
        from hpcinfer.config.loader import dump_resolved
        return dump_resolved(self)


