"""Errors the compiler finds (inputs, array size, sbatch values), as config errors.

They are reported like every other config error: file:line of the key that caused them, the
key path, what is wrong and what to write instead (hpcinfer.config.ConfigError).
"""
from __future__ import annotations


def plan_error(cfg, key_path: str, problem: str, fix: str):
    """A ConfigError pointing at where key_path was set in the job file (or profile)."""
    return cfg.error_at(key_path, problem, fix)
