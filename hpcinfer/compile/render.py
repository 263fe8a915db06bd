"""JobPlan -> text. Pure: plan in, text out; nothing here touches the filesystem but the
templates themselves (shipped in the wheel, found with importlib.resources)."""
from __future__ import annotations

import shlex

from hpcinfer.compile.plan import EXIT_LOST_RANK, EXIT_REQUEUE, JobPlan

_TEMPLATES = {"single": "sbatch_single.j2", "array": "sbatch_array.j2",
              "multinode": "sbatch_multinode.j2"}


def shq(value) -> str:
    """Shell-quote one word. Every user-supplied string in a script goes through this."""
    return shlex.quote(str(value))


def comment(value) -> str:
    """Text safe inside a `#` comment: a newline there would end the comment and start a
    command, so control characters are shown escaped instead."""
    return "".join(c if c >= " " and c != "\x7f" else repr(c)[1:-1] for c in str(value))


def _environment():
    import jinja2  # ~20 ms; only commands that render pay for it
    from importlib.resources import files
    root = files("hpcinfer.job_templates")
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text("utf-8")),
        undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["shq"] = shq
    env.filters["comment"] = comment
    return env


def describe(plan: JobPlan) -> str:
    """One line saying what the job will do."""
    ranks = f"{plan.nodes} node(s) x {plan.ntasks_per_node} rank(s)"
    if plan.shape == "array":
        throttle = f", at most {plan.array_throttle} at a time" if plan.array_throttle else ""
        per_task = ("one per shard" if plan.shards_per_task == 1 else
                    f"{plan.shards_per_task} shards each, one per replica")
        return (f"job array of {plan.array_size} tasks ({per_task}{throttle}) over "
                f"{plan.total_rows} rows; each task {ranks}")
    return f"{plan.shape} job over {plan.total_rows} rows in {len(plan.shards)} shard(s); {ranks}"


def render_script(plan: JobPlan) -> str:
    """The sbatch script for the plan's shape."""
    trap_signals = [plan.signal] + (["TERM"] if plan.signal != "TERM" else [])
    template = _environment().get_template(_TEMPLATES[plan.shape])
    return template.render(plan=plan, description=describe(plan), exit_requeue=EXIT_REQUEUE,
                           exit_lost_rank=EXIT_LOST_RANK, trap_signals=trap_signals,
                           num_ranks=plan.nodes * plan.ntasks_per_node)


def render_container_def(plan: JobPlan, *, wheel: str | None = None, commit: str = "unknown") -> str:
    """An Apptainer definition for an image that runs exactly this hpcinfer version.

    `wheel`: absolute path of the hpcinfer wheel that %files copies in (default: the one
    `hpcinfer container build` puts in the job dir). CUDA comes from plan.cuda (compile/container.py).
    """
    from hpcinfer.compile.container import (WHEEL_DIR_IN_IMAGE, choose_cuda,
                                            default_wheel_path)
    wheel = wheel or str(default_wheel_path(plan.job_dir, plan.version))
    cuda = choose_cuda(None, getattr(plan, "cuda", None))
    template = _environment().get_template("apptainer.def.j2")
    return template.render(plan=plan, cuda=cuda, wheel=wheel, commit=commit,
                           wheel_in_image=f"{WHEEL_DIR_IN_IMAGE}/{wheel.rsplit('/', 1)[-1]}",
                           wheel_dir=WHEEL_DIR_IN_IMAGE)
