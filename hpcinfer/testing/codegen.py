"""Compile a Triton kernel for an H100/H200 (sm_90) without a GPU, to read its PTX in tests.

CI has no GPU and runs the kernels under Triton's interpreter, which accepts programs the GPU
compiler refuses and says nothing about the code the GPU runs. Triton compiles for a target
it does not run on (ptxas ships in its wheel), so tests can check that a kernel compiles for
sm_90 at all and what its code does (tests/kernels/test_sm90_codegen.py). Needs
TRITON_INTERPRET unset or 0 when the kernel module is imported: under the interpreter
``@triton.jit`` gives functions that cannot be compiled, so the tests call ``compile_sm90``
in a subprocess (``run_in_compiler_process``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, *, floats: tuple = (),
                 divisible: tuple = (), num_warps: int = 4, num_stages: int = 3
                 ) -> dict[str, str]:
    """{"ttgir": ..., "ptx": ...} of ``fn`` for sm_90. ``pointers``: argument -> Triton
    pointer type ("*bf16", "*fp8e4nv", "*i32", ...); ``floats``: fp32 scalar arguments; other
    non-constexpr arguments are i32. Pointers, ``stride*`` arguments and the integers named in
    ``divisible`` are taken as divisible by 16, as the JIT specialises such values at a real
    launch (so loads vectorise and pipeline as they would with the model's sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = [n for n in names
               if signature[n].startswith("*") or n.startswith("stride") or n in divisible]
    source = ASTSource(fn, signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return {"ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"]}


def run_in_compiler_process(code: str, timeout: int = 600) -> object:
    """Run ``code`` (which sets ``result`` to something JSON-serialisable) in a fresh Python
    with TRITON_INTERPRET=0; returns ``result``. Raises RuntimeError with the child's stderr
    when it fails (a kernel that does not compile for sm_90 says so there)."""
    script = code + "\nimport json, sys\nsys.stdout.write('\\n@@RESULT@@' + json.dumps(result))\n"
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode or "@@RESULT@@" not in done.stdout:
        raise RuntimeError(f"compiling for sm_90 failed (exit {done.returncode}):\n"
                           + done.stderr[-4000:])
    return json.loads(done.stdout.rsplit("@@RESULT@@", 1)[1])
