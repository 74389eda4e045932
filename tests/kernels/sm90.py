"""Build a Triton kernel for an H100/H200 (sm_90) on a machine without a GPU, with the Triton wheel's
ptxas, and report what the interpreter cannot show: register spills, tensor-core and cp.async use.
Call it in a process without TRITON_INTERPRET (the interpreter patches triton.language): `run_build`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(fn, const: dict, types: dict, num_warps: int, num_stages: int, divisible: tuple = ()) -> dict:
    """fn: a @triton.jit kernel; const: its constexprs; types: signature types by arg name (others i32).
    Pointers, stride_* args and those named in `divisible` (ints a launch passes as multiples of 16,
    which Triton then specializes on) are specialized as 16-divisible, as a launch with aligned tensors is."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride_") or n in divisible)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "mma": "mma" in ptx, "cp_async": "cp.async" in ptx}


def run_build(expr: str) -> dict:
    """Evaluate `expr` (a call returning build()'s dict, e.g. "m.f(3)" with `import ... as m` before a ';')
    in a fresh interpreter without TRITON_INTERPRET; skips the calling test when the wheel has no ptxas."""
    import pytest

    if not all(os.path.exists(os.path.join(tools_dir(), t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("no ptxas/cuobjdump in this Triton wheel")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    stmt, _, value = expr.rpartition(";")
    code = f"import json; {stmt}; print(json.dumps({value.strip()}))"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
