"""The job-level structured-outputs constraint, compiled before any row is read or the model
is loaded.

``hpcinfer validate`` checks a constraint's shape on the login node (io/constraints.py), but
only xgrammar knows every rule it refuses (an EBNF syntax error, minProperties above what
the schema allows, a $ref cycle ...), and xgrammar imports torch,
so it cannot run there. Without this check such a job would load the model, read every row
and set each one aside as a bad row. Here the worker loads the tokenizer (seconds) and
compiles ``sampling.structured_outputs`` with the engine's own compiler
(engine/structured.py); a failure stops the task with one message naming the key, which
``hpcinfer status`` shows. Rows that carry their own constraint are still judged one by one
(a broken one is a bad row). The compiled grammar is not kept: the engine compiles it again
at the first request (a schema takes milliseconds to a second; the model load is longer).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hpcinfer.worker.setup import TaskFailed, _tokenizer_path, is_pooling

log = logging.getLogger("hpcinfer.worker")


def check_job_constraint(cfg, model_path: str) -> None:
    """Raise TaskFailed when the job's ``sampling.structured_outputs`` does not compile."""
    constraint = cfg.sampling.structured_outputs
    if constraint is None or is_pooling(cfg):
        return
    t0 = time.perf_counter()
    # the tokenizer the engine will load: model.tokenizer, else the model's own
    problem = compile_problem(dict(constraint), model_path, _tokenizer_path(cfg))
    if problem:
        raise TaskFailed(
            f"sampling.{problem}. This job-level constraint applies to every row, so the task "
            "stops before loading the model: fix sampling.structured_outputs in the job file "
            "(what xgrammar does not support: docs/structured-outputs.md, \"What xgrammar "
            "refuses\"), then render or submit the job again (with --restart if this output "
            "dir has committed work)")
    log.info("sampling.structured_outputs (%s) compiles (%.2f s)",
             next(k for k in constraint if constraint[k] not in (None, False)),
             time.perf_counter() - t0)


def compile_problem(constraint: dict, model_path: str,
                    tokenizer_path: str | None = None) -> str | None:
    """None when ``constraint`` (a structured_outputs mapping) compiles for this model's
    tokenizer, else xgrammar's reason as "structured_outputs.<kind> does not compile: ..."."""
    import torch
    from transformers import AutoTokenizer

    from hpcinfer.engine.structured import StructuredOutputs
    from hpcinfer.engine.structured_params import StructuredOutputsParams
    try:
        params = StructuredOutputsParams(**constraint)
    except (TypeError, ValueError) as exc:
        return f"structured_outputs: {exc}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    except (OSError, ValueError) as exc:
        raise TaskFailed(f"cannot load the tokenizer of {tokenizer_path or model_path} "
                         f"({' '.join(str(exc).split())}): point model.id (or model.tokenizer) at a complete "
                         "checkpoint") from None
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        compiler = StructuredOutputs(tokenizer, _vocab_size(model_path, len(tokenizer)), eos,
                                     torch.device("cpu"), fills_masks=False, max_threads=1)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise TaskFailed(f"xgrammar cannot read the tokenizer of {tokenizer_path or model_path} "
                         f"({exc}), so this job's sampling.structured_outputs cannot be used "
                         "with this model: remove the constraint or use another model") from None
    try:
        compiler.compile(params)
    except ValueError as exc:
        return str(exc)
    return None


def _vocab_size(model_path: str, default: int) -> int:
    """The model's logits width from config.json (multimodal models: their text config), as
    the engine lays the tokenizer over it."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return default
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else default
