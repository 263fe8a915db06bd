"""Triton kernels and their torch references, installed as ``hpcinfer.kernels``.

Every kernel comes in three parts: a ``_name_kernel`` jit function, a launcher that checks
shapes, strides and dtypes, and the torch reference in :mod:`hpcinfer.kernels.reference`
that tests compare it against. Importing this package does not import triton; the
launchers live in their own modules so the CPU path never needs a GPU toolchain.
"""
