"""MPI/Slurm/torchrun bootstrap, TP/PP groups and spawned ranks (world, groups, spawn, ...).

Importing this package is cheap (no torch): the submodules are imported where used.
"""
from __future__ import annotations


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """vLLM's cleanup between two LLM objects in one script: stop the worker ranks this
    process spawned, leave the process group, and give cached device memory back.
    ``shutdown_ray`` is accepted for vLLM scripts (hpcinfer uses no Ray)."""
    import gc
    import sys

    spawn = sys.modules.get("hpcinfer.distributed.spawn")
    if spawn is not None:  # only if ranks were ever spawned (else nothing to stop)
        while spawn._ACTIVE:
            spawn._ACTIVE.pop().close()
    world = sys.modules.get("hpcinfer.distributed.world")
    if world is not None:
        world.destroy_world()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["cleanup_dist_env_and_memory"]
