"""What the worker builds once per task from job.yaml: input spec, model path, engine,
output format, request builder and loop options. Each function raises TaskFailed (exit 2)
with what to fix when the config or the environment is wrong.

Order matters: ``resolve`` sets the HF offline variables before anything imports
transformers, and runs before ``load_engine`` imports torch, so a missing model is reported
in about a second.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("hpcinfer.worker")


class TaskFailed(Exception):
    """Something the user must fix; str() says what (exit 2)."""


SUPPORTED_TASKS = ("generate", "chat", "embed", "classify", "score", "reward")
POOLING_TASKS = ("embed", "classify", "score", "reward")     # pooling_loop.PoolingShardLoop


def is_pooling(cfg) -> bool:
    return str(cfg.task) in POOLING_TASKS


def check_supported(cfg) -> None:
    """What this worker cannot run yet, refused before any model is loaded."""
    if cfg.task not in SUPPORTED_TASKS:
        raise TaskFailed(f"task {cfg.task} is not supported: use one of "
                         f"{', '.join(SUPPORTED_TASKS)}")
    from hpcinfer.config.checks import pooling_io_problem   # validate's rule, as a backstop
    problem = pooling_io_problem(str(cfg.task), str(cfg.input.format), str(cfg.output.format))
    if problem:
        raise TaskFailed(f"{problem[0]}: {problem[1]}: {problem[2]}")
    if int(cfg.sampling.n) != 1 and not is_pooling(cfg):
        raise TaskFailed(f"sampling.n={cfg.sampling.n}: several completions per row are not "
                         "written yet (one text per row); use n: 1 (or one row per sample "
                         "with different seeds)")


def input_spec(cfg):
    from hpcinfer.io.rows import InputSpec
    try:
        return InputSpec.from_config(cfg.input, str(cfg.task))
    except ValueError as exc:
        raise TaskFailed(f"input: {exc}") from None


def refuse_duplicate_ids(spec, shards) -> None:
    """Ids must be unique (docs/exactly-once.md): refuse before any work is done.

    Checks the whole files this task's shards come from (`hpcinfer validate` checks across
    all files). A file that cannot be read is left to its shard, which fails with the reason.
    """
    from hpcinfer.io.readers import find_duplicate_ids
    if not spec.id_name:
        return
    files = sorted({str(s.file) for s in shards})
    fmt = spec.format
    try:
        dups = find_duplicate_ids(files, spec.id_name, fmt)
    except Exception:  # noqa: BLE001 - a corrupt file: check the readable ones alone
        dups = []
        for path in files:
            try:
                dups += find_duplicate_ids([path], spec.id_name, fmt)
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot check ids of %s (%s); its shard will report it", path, exc)
    if dups:
        shown = "; ".join(f"{d.id!r} at " + ", ".join(f"{Path(f).name} row {i}"
                                                     for f, i in d.locations[:3])
                          for d in dups[:5])
        raise TaskFailed(f"input has duplicate {spec.id_name} values ({shown}"
                         f"{'; ...' if len(dups) > 5 else ''}): ids must be unique so each row "
                         "is answered exactly once; fix the input (hpcinfer validate lists "
                         "them) and render the job again")


def resolve(cfg):
    """HF offline mode, then the model's absolute snapshot path (no network, no torch)."""
    from hpcinfer.hub.errors import HubError
    from hpcinfer.hub.offline import resolve_model, set_offline_env
    set_offline_env(os.environ)
    try:
        model = resolve_model(str(cfg.model.id), cfg.model.revision)
    except HubError as exc:
        raise TaskFailed(str(exc)) from None
    check_model_files(Path(model.path), str(cfg.model.id),
                      weights=getattr(cfg.engine, "load_format", "auto") != "dummy")
    return model


def check_model_files(path: Path, model_id: str, weights: bool = True) -> None:
    """A directory without config.json or weights fails here with advice, rather than
    deep inside transformers with a message about tokenizer classes (``weights`` False:
    engine.load_format dummy, which reads config.json only)."""
    advice = "point model.id at a complete checkpoint (config.json, *.safetensors, tokenizer)"
    if not model_id.startswith(("/", ".", "~")):    # a hub id: its snapshot is damaged
        advice = (f"run `hpcinfer download {model_id}` on a login node again (`hpcinfer "
                  f"verify-model {model_id}` shows what is missing)")
    if not (path / "config.json").is_file():
        raise TaskFailed(f"model dir {path} has no config.json: {advice}")
    if weights and not any(path.glob("*.safetensors")):
        raise TaskFailed(f"model dir {path} has no *.safetensors weights: {advice}")


def _tokenizer_path(cfg) -> str | None:
    from hpcinfer.hub.errors import HubError
    from hpcinfer.hub.offline import resolve_model
    name = cfg.model.tokenizer
    if not name:
        return None
    try:
        return resolve_model(str(name)).path
    except HubError as exc:
        raise TaskFailed(f"model.tokenizer: {exc}") from None


def engine_config(cfg, model, device: str | None = None):
    """``device``: this rank's device when it differs from resources.device (one-rank
    data-parallel replicas on GPU: ranks.device_of)."""
    from hpcinfer.engine.config import EngineConfig
    from hpcinfer.engine.hf_overrides import with_hf_overrides
    e = cfg.engine
    try:
        return EngineConfig(
            model=with_hf_overrides(model.path, cfg.model.hf_overrides),
            dtype=str(cfg.model.dtype), max_model_len=cfg.model.max_model_len,
            max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
            block_size=int(e.block_size), enable_prefix_caching=e.enable_prefix_caching,
            gpu_memory_utilization=e.gpu_memory_utilization,
            kv_cache_memory_bytes=e.kv_cache_memory_bytes, enforce_eager=e.enforce_eager,
            async_scheduling=e.async_scheduling, pipeline_micro_batches=e.pipeline_micro_batches,
            tensor_parallel_size=int(cfg.parallel.tensor),
            pipeline_parallel_size=int(cfg.parallel.pipeline),
            device=device or str(cfg.resources.device),
            tokenizer=_tokenizer_path(cfg), quantization=e.quantization,
            kv_cache_dtype=e.kv_cache_dtype, load_format=e.load_format,
            **lora_engine_args(cfg))
    except ValueError as exc:
        raise TaskFailed(f"engine: {exc}") from None


def load_engine(cfg, model, make_engine=None, device: str | None = None):
    """Load the model once (the slow step: weights, KV cache; pooling tasks have no cache).
    ``make_engine(config)`` builds a generate/chat engine (default LLMEngine; the worker's
    replica driver passes replica.DriverSide.make_engine)."""
    from hpcinfer.engine.llm_engine import LLMEngine
    from hpcinfer.multimodal.workers import ENV_WORKERS
    config = engine_config(cfg, model, device)
    # A job processes its image rows one at a time in the reader thread (worker/loop.py):
    # one preprocessing worker process is all it uses (HPCINFER_PREPROCESS_WORKERS wins).
    os.environ.setdefault(ENV_WORKERS, "1")
    try:
        if is_pooling(cfg):
            from hpcinfer.engine.pooling import PoolingEngine
            return PoolingEngine(config, str(cfg.task), pooler_config=pooler_config(cfg))
        return (make_engine or LLMEngine)(config)
    except (ValueError, OSError) as exc:
        raise TaskFailed(f"cannot load model {model.path}: {exc}") from None


def pooler_config(cfg) -> dict:
    """The job's ``pooling:`` block as vLLM's PoolerConfig fields (engine.pooling)."""
    return cfg.pooling.model_dump() if getattr(cfg, "pooling", None) is not None else {}


def output_format(cfg, spec, shard):
    """The part format of one shard (output.format, id and passthrough columns)."""
    from hpcinfer.io.formats import make_format
    # OpenAI's "created": a constant of the shard's input file (its mtime), not the time a
    # row was answered, so a resumed or resubmitted job writes the same bytes.
    try:
        created_s = int(os.stat(shard.file).st_mtime)
    except OSError:
        created_s = 0
    try:
        return make_format(str(cfg.output.format), task=str(cfg.task), id_name=spec.id_name,
                           passthrough=tuple(spec.passthrough), logprobs=bool(cfg.output.logprobs),
                           prompt_logprobs=cfg.task in ("generate", "chat")
                           and cfg.sampling.prompt_logprobs is not None,
                           text_field=str(getattr(cfg.output, "text_field", "text")),
                           model=str(cfg.model.id), created_s=created_s)
    except ValueError as exc:
        raise TaskFailed(f"output: {exc}") from None


def lora_engine_args(cfg) -> dict:
    """EngineConfig's LoRA fields from the job's ``lora:`` block (none without adapters)."""
    lora = getattr(cfg, "lora", None)
    if lora is None or not lora.adapters:
        return {}
    return {"enable_lora": True, "max_loras": lora.max_loras or len(lora.adapters),
            "max_lora_rank": lora.max_lora_rank}


def lora_requests(cfg) -> dict:
    """lora.adapters as LoRARequests; ids by sorted name, so every rank and task agrees."""
    from hpcinfer.lora.request import LoRARequest
    adapters = getattr(getattr(cfg, "lora", None), "adapters", None) or {}
    return {name: LoRARequest(name, i + 1, adapters[name])
            for i, name in enumerate(sorted(adapters))}


def request_builder(cfg, engine):
    from hpcinfer.worker.requests import RequestBuilder, base_sampling
    return RequestBuilder(engine.tokenizer, base_sampling(cfg.sampling), engine.max_model_len,
                          on_long_prompt=str(cfg.resilience.on_long_prompt),
                          want_logprobs=bool(cfg.output.logprobs),
                          adapters=lora_requests(cfg),
                          multimodal=getattr(engine, "multimodal", None),
                          mm_processor_kwargs=dict(
                              getattr(cfg.input, "mm_processor_kwargs", None) or {}) or None)


def loop_options(cfg, engine):
    from hpcinfer.worker.loop import LoopOptions
    return LoopOptions(commit_every_rows=int(cfg.output.commit_every_rows),
                       commit_every_s=float(cfg.output.commit_every_s),
                       on_bad_row=str(cfg.resilience.on_bad_row),
                       # Enough queued rows to refill every batch slot, few enough that
                       # memory does not grow with the input.
                       max_in_flight=2 * engine.config.max_num_seqs,
                       step_delay_s=step_delay_s())


# Test hooks: slow every engine step by HPCINFER_WORKER_STEP_DELAY_S seconds, in the first
# HPCINFER_WORKER_STEP_DELAY_RUNS runs only (by SLURM_RESTART_COUNT; default: every run), so
# signal and kill tests can land while rows are in flight. Unset in production.
STEP_DELAY_ENV = "HPCINFER_WORKER_STEP_DELAY_S"
STEP_DELAY_RUNS_ENV = "HPCINFER_WORKER_STEP_DELAY_RUNS"


def step_delay_s() -> float:
    delay_s = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    runs = os.environ.get(STEP_DELAY_RUNS_ENV)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if delay_s and runs is not None and restart >= int(runs):
        return 0.0
    if delay_s:
        log.warning("test hook %s=%s: every engine step sleeps", STEP_DELAY_ENV, delay_s)
    return delay_s
