"""Triton kernels and their torch references, installed as ``hpcinfer.kernels``.

Every kernel comes in three parts: a ``_name_kernel`` jit function, a launcher that checks
shapes, strides and dtypes, and the torch reference in :mod:`hpcinfer.kernels.reference`
that tests compare it against. Importing this package does not import triton; the
launchers live in their own modules so the CPU path never needs a GPU toolchain.
"""

if __name__ == "kernels":
    # This directory imported as a top-level ``kernels``: the repository root is on sys.path
    # (``python -m ...`` or ``python -c`` run from a checkout). That name belongs to Hugging
    # Face's kernels package, which transformers >= 5.25 requires and imports; if it is
    # installed, hand the import over to it (the module left in sys.modules is what the import
    # statement returns) instead of shadowing it. If it is not, stay this empty package:
    # older transformers import whatever ``kernels`` they find to read its version.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
