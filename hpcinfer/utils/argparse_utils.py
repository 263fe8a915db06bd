"""FlexibleArgumentParser at vLLM's import path (``vllm.utils.argparse_utils``)."""
from __future__ import annotations

import argparse
import sys


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that, as vLLM's, also takes ``--max_model_len`` for
    ``--max-model-len``: underscores in a long flag's name are read as dashes."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([_dashed(a) for a in args], namespace)


def _dashed(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value
