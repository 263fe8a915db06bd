"""The job's ``lora:`` block: each adapter read and checked against the base before
submission (rank, files, targets and sizes), torch-free (hpcinfer.lora.adapter_config)."""
from __future__ import annotations

import os

from hpcinfer.config.schema import JobConfig
from hpcinfer.lora.adapter_config import AdapterError, check_rank, read_adapter_config
from hpcinfer.lora.base_check import adapter_base_problem

GENERATION_TASKS = ("generate", "chat")


def check_lora_consistency(cfg: JobConfig) -> None:
    if cfg.input.adapter_field and not cfg.lora.adapters:
        raise cfg.error_at("input.adapter_field", "rows name adapters but lora.adapters is "
                           "empty", "list the adapters under lora.adapters: {name: path}, or "
                           "remove input.adapter_field")
    if cfg.lora.adapters and cfg.parallel.pipeline > 1:
        # The slot pool checks every adapter target against this rank's layers; a pipeline
        # stage holds only some of them (and the engine refuses enable_lora with stages).
        raise cfg.error_at("parallel.pipeline", f"LoRA adapters do not run with pipeline "
                           f"parallelism (pipeline: {cfg.parallel.pipeline})",
                           "set parallel.pipeline: 1 and split the model with parallel.tensor "
                           "instead (tensor parallelism takes adapters), or drop lora.adapters")
    if cfg.lora.adapters and cfg.task not in GENERATION_TASKS:
        raise cfg.error_at("lora.adapters", f"task {cfg.task} takes no LoRA adapters yet",
                           "remove lora.adapters, or use task generate or chat")


def check_lora_adapters(cfg: JobConfig) -> None:
    """Each adapter readable, within max_lora_rank and, when the base is a local directory,
    fitting its config.json. Hub adapter ids are checked once resolve_job_adapters has
    pinned them (as hub model ids are checked once resolved)."""
    model_dir = cfg.model.id if os.path.isabs(cfg.model.id) else None
    for name, path in cfg.lora.adapters.items():
        key = f"lora.adapters.{name}"
        if not os.path.isabs(path):
            continue
        try:
            adapter = read_adapter_config(path, name)
            check_rank(adapter, cfg.lora.max_lora_rank, name)
        except AdapterError as exc:   # the message says what to do
            raise cfg.error_at(key, str(exc)) from None
        problem = adapter_base_problem(adapter, model_dir) if model_dir else None
        if problem is not None:
            raise cfg.error_at(key, f"adapter {name!r} does not fit model {cfg.model.id}: "
                               f"{problem}", "use an adapter trained on this base model")


def resolve_job_adapters(cfg: JobConfig, *, download: bool = False) -> JobConfig:
    """``cfg`` with each hub adapter id in lora.adapters replaced by its downloaded snapshot
    directory (``hpcinfer download --job``; with ``download`` fetched now if missing), then
    every adapter checked. Runs at validate/render, after the model is resolved, so the base
    check sees the model's snapshot. ConfigError at the adapter's line otherwise."""
    hub_ids = {name: v for name, v in cfg.lora.adapters.items() if not os.path.isabs(v)}
    if not hub_ids:
        return cfg
    from hpcinfer.hub.adapters import resolve_adapter, resolve_or_download_adapter
    from hpcinfer.hub.errors import HubError
    pinned = dict(cfg.lora.adapters)
    for name, adapter_id in hub_ids.items():
        try:
            pinned[name] = (resolve_or_download_adapter(adapter_id, job_file=cfg.source_file)
                            if download else resolve_adapter(adapter_id,
                                                             job_file=cfg.source_file))
        except HubError as exc:
            fix = "" if download else "or render with --download to fetch it now"
            raise cfg.error_at(f"lora.adapters.{name}", str(exc), fix) from None
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"adapters": pinned})})
    check_lora_adapters(cfg)
    return cfg
