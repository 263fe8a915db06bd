"""Config -> JobPlan: every scheduling decision is made here, once, as data."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from hpcinfer.compile import inputs
from hpcinfer.compile.errors import plan_error
from hpcinfer.compile.plan import ContainerPlan, JobPlan

# #SBATCH lines are parsed by sbatch, not bash, and a newline would end the comment and start
# a shell command: values are restricted to characters that need no quoting anywhere.
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9._:,=@%+/\-\[\]&|!()*]+$")
_SBATCH_FLAG = re.compile(r"^[a-z][a-z0-9-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Flags the compiler owns; extra_sbatch may not override them (the plan would lie).
_OWNED_FLAGS = {
    "array": "input.shard_rows / resources.array_parallelism", "job-name": "name",
    "nodes": "parallel.nodes", "ntasks-per-node": "resources.gpus_per_node",
    "cpus-per-task": "resources.cpus_per_task", "mem": "resources.mem", "time": "resources.time",
    "partition": "resources.partition", "account": "resources.account", "qos": "resources.qos",
    "constraint": "resources.constraint", "gpus-per-node": "resources.gpus_per_node",
    "gres": "resources.gpus_per_node", "signal": "resilience.signal",
    "requeue": "resilience.max_requeues", "no-requeue": "resilience.max_requeues",
    "open-mode": "(always append)", "output": "(always logs/)", "error": "(always logs/)",
    "chdir": "output.dir (the job dir)",
}


def _prof(cfg, key: str, default):
    """A field of the cluster profile's slurm block (JobConfig.profile)."""
    value = getattr(cfg.profile, key, None)
    return default if value is None else value


def build_plan(cfg, *, job_dir: str | None = None, python: str | None = None,
               version: str | None = None) -> JobPlan:
    """Decide shards, shape, ranks, flags, env and container for a loaded JobConfig.

    Reads input metadata (row counts) but writes nothing. Raises ConfigError on anything the
    user must fix.
    """
    from hpcinfer import __version__
    files = inputs.discover(cfg)
    shards = inputs.make_shards(files, int(cfg.input.shard_rows))
    if not shards:
        raise plan_error(cfg, "input.path", "the input files contain no rows",
                         "point input.path at non-empty JSONL/Parquet files")
    nodes = int(cfg.parallel.nodes)
    ntasks_per_node = int(cfg.ranks_per_node)
    # Each array task runs one shard per data-parallel replica (each replica its own shards).
    replicas = max(1, nodes * ntasks_per_node // (cfg.parallel.tensor * cfg.parallel.pipeline))
    num_tasks = -(-len(shards) // replicas)
    shape = "multinode" if nodes > 1 else ("array" if num_tasks > 1 else "single")
    array_size = num_tasks if shape == "array" else 0
    max_array = int(_prof(cfg, "max_array_size", 1001))
    if array_size > max_array:
        raise plan_error(cfg, "input.shard_rows",
                         f"{len(shards)} shards would need a job array of {array_size} tasks, "
                         f"more than this cluster's MaxArraySize ({max_array})",
                         f"raise input.shard_rows to at least "
                         f"{-(-sum(f.num_rows for f in files) // (max_array * replicas))} "
                         "(fewer, larger shards)")
    use_gpu = _device(cfg) == "cuda"
    gpus = int(cfg.resources.gpus_per_node) if use_gpu else 0
    throttle = cfg.resources.array_parallelism if shape == "array" else None
    job_dir = os.path.abspath(job_dir or str(cfg.output.dir))
    return JobPlan(
        name=str(cfg.name), config_file=_config_file(cfg), job_dir=job_dir,
        version=version or __version__, shape=shape, shards=shards, array_size=array_size,
        array_throttle=int(throttle) if throttle else None, nodes=nodes,
        ntasks_per_node=ntasks_per_node, gpus_per_node=gpus,
        sbatch_flags=_sbatch_flags(cfg, shape, array_size, throttle, nodes, ntasks_per_node, gpus,
                                   job_dir),
        launcher=str(_prof(cfg, "launcher", "srun")), mpi_plugin=str(_prof(cfg, "mpi_plugin", "pmix")),
        python=python or sys.executable, env=_env(cfg), modules=_modules(cfg),
        container=_container(cfg, job_dir, files, use_gpu),
        signal=_signal_name(cfg), signal_seconds=int(cfg.resilience.signal_seconds),
        max_requeues=int(cfg.resilience.max_requeues),
        total_rows=sum(f.num_rows for f in files), input_files=tuple(f.path for f in files),
        env_from_environment=_env_from_environment(cfg), cuda=_cuda(cfg),
        shards_per_task=replicas if shape == "array" else 1)


def _modules(cfg) -> tuple[str, ...]:
    modules = tuple(_prof(cfg, "modules", ()))
    if getattr(cfg, "container", None) is not None:
        modules += tuple(m for m in _prof(cfg, "container_modules", ()) if m not in modules)
    return modules


def _device(cfg) -> str:
    return str(getattr(cfg.resources, "device", "cuda") or "cuda")


def _config_file(cfg) -> str:
    return os.path.abspath(cfg.source_file) if cfg.source_file else "<unknown>"


def _signal_name(cfg) -> str:
    name = str(cfg.resilience.signal).upper()
    return name[3:] if name.startswith("SIG") else name


def _sbatch_flags(cfg, shape, array_size, throttle, nodes, ntasks_per_node, gpus, job_dir):
    res = cfg.resources
    flags: dict[str, tuple[str, str]] = {  # flag -> (value, key path it came from)
        "job-name": (str(cfg.name), "name"),
        "nodes": (str(nodes), "parallel.nodes"),
        "ntasks-per-node": (str(ntasks_per_node), "resources.gpus_per_node"),
        "cpus-per-task": (str(res.cpus_per_task), "resources.cpus_per_task"),
        "time": (str(res.time), "resources.time"),
        "signal": (f"B:{_signal_name(cfg)}@{int(cfg.resilience.signal_seconds)}", "resilience.signal"),
        "requeue": ("", "resilience.max_requeues"),
        "open-mode": ("append", "resilience"),
        "output": ("logs/slurm-%A_%a.out" if shape == "array" else "logs/slurm-%j.out", "output"),
    }
    if _SBATCH_VALUE.match(job_dir):
        # Makes logs/ resolve in the job dir even when the script is submitted from elsewhere.
        # A job dir with spaces or quotes cannot go on an #SBATCH line: hpcinfer then submits
        # from inside it, and the header says to `cd` there first.
        flags["chdir"] = (job_dir, "output.dir")
    if res.mem:
        flags["mem"] = (str(res.mem), "resources.mem")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key, None):
            flags[key] = (str(getattr(res, key)), f"resources.{key}")
    if gpus:
        gpu_type = getattr(res, "gpu_type", None)
        flags["gpus-per-node"] = (f"{gpu_type}:{gpus}" if gpu_type else str(gpus),
                                  "resources.gpus_per_node")
    if shape == "array":
        flags["array"] = (f"0-{array_size - 1}" + (f"%{int(throttle)}" if throttle else ""),
                          "resources.array_parallelism")
    for key, value in (getattr(res, "extra_sbatch", None) or {}).items():
        key = str(key).lstrip("-")
        path = f"resources.extra_sbatch.{key}"
        if not _SBATCH_FLAG.match(key):
            raise plan_error(cfg, path, f"{key!r} is not an sbatch option name",
                             "use the long option name without dashes, e.g. mail-type")
        if key in _OWNED_FLAGS:
            raise plan_error(cfg, path, f"--{key} is set by hpcinfer",
                             f"set it through {_OWNED_FLAGS[key]} instead")
        flags[key] = ("" if value is True or value is None else str(value), path)
    for key, (value, path) in flags.items():
        if value and not _SBATCH_VALUE.match(value):
            raise plan_error(cfg, path, f"{value!r} cannot go on an #SBATCH line (spaces, "
                             "quotes, newlines and shell characters are not allowed there)",
                             "use plain names: letters, digits and . _ - : , = @ % + /")
    return tuple(sorted((k, v) for k, (v, _) in flags.items()))


# Multi-rank GPU jobs: NCCL warnings reach the log (a start-up failure says why), and a rank
# whose peer died gets an error from its collective instead of waiting in it forever.
_NCCL_DEFAULTS = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def _env(cfg) -> tuple[tuple[str, str], ...]:
    env = {}
    if _prof(cfg, "offline_compute", False):
        # compute nodes cannot reach the Hub: fail fast instead of hanging on a download.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if _device(cfg) == "cuda" and cfg.parallel.tensor * cfg.parallel.pipeline > 1:
        env.update(_NCCL_DEFAULTS)
        env.update({str(k): str(v) for k, v in (_prof(cfg, "nccl_env", None) or {}).items()})
    for key, value in (getattr(cfg, "env", None) or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise plan_error(cfg, f"env.{key}", f"{key!r} is not a valid environment variable name",
                             "use letters, digits and underscores, not starting with a digit")
        env[str(key)] = "" if value is None else str(value)
    return tuple(sorted(env.items()))


def _cuda(cfg) -> str:
    from hpcinfer.compile.container import ContainerError, choose_cuda
    pinned = getattr(cfg.container, "cuda", None) if cfg.container is not None else None
    try:
        return choose_cuda(_prof(cfg, "cuda_driver", None), pinned).cuda
    except ContainerError as exc:
        key = "container.cuda" if pinned else "cluster"
        raise plan_error(cfg, key, str(exc), "fix slurm.cuda_driver in the cluster profile "
                         "or set container.cuda") from None


def _env_from_environment(cfg) -> tuple[str, ...]:
    names = tuple(str(n) for n in _prof(cfg, "env_from_environment", ()))
    for name in names:
        if not _ENV_NAME.match(name):
            raise plan_error(cfg, "cluster", f"the cluster profile's env_from_environment has "
                             f"{name!r}, which is not a variable name", "fix the profile")
    return names


def _container(cfg, job_dir: str, files, use_gpu: bool) -> ContainerPlan | None:
    c = getattr(cfg, "container", None)
    if c is None:
        return None
    runtime = str(getattr(c, "runtime", None) or _prof(cfg, "container_runtime", "apptainer"))
    binds = {job_dir, *inputs.input_dirs(files)}
    # The model (its whole models--org--name folder for a hub snapshot) and the HF cache.
    from hpcinfer.compile.container import model_binds
    from hpcinfer.hub.paths import hub_cache_dir
    hf_home = os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface")
    models = [str(p) for p in (cfg.model.id, cfg.model.tokenizer) if p and os.path.isabs(str(p))]
    binds.update(model_binds(models, hf_home, str(hub_cache_dir())))
    lora = getattr(cfg, "lora", None)   # LoRA adapter directories (absolute after loading)
    binds.update(str(p) for p in (getattr(lora, "adapters", None) or {}).values())
    binds.add("/dev/shm")  # the host's shm (sized by the node), which NCCL needs
    binds.update(str(b) for b in (getattr(c, "binds", None) or ()))
    env = {}
    for key, value in (getattr(c, "env", None) or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise plan_error(cfg, f"container.env.{key}", f"{key!r} is not a valid variable name",
                             "use letters, digits and underscores, not starting with a digit")
        env[str(key)] = str(value)
    site_dir = None
    if getattr(c, "hpcinfer", "image") == "job-dir":
        # The job dir is bound at its own path, so its copy of hpcinfer (jobdir.write_job_dir)
        # is importable inside the image; it goes first so it wins over any other hpcinfer.
        from hpcinfer.compile.site import SITE_DIR_NAME
        site_dir = os.path.join(job_dir, SITE_DIR_NAME)
        env["PYTHONPATH"] = site_dir + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    return ContainerPlan(runtime=runtime, image=str(c.image), binds=tuple(sorted(binds)),
                         env=tuple(sorted(env.items())), use_gpu=use_gpu,
                         python=str(getattr(c, "python", None) or "python3"), site_dir=site_dir)
