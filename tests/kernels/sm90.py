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
from collections import Counter
from pathlib import Path


def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(fn, const: dict, types: dict, num_warps: int, num_stages: int, divisible: tuple = (),
          maxnreg: int | None = None) -> dict:
    """fn: a @triton.jit kernel; const: its constexprs; types: signature types by arg name (others i32).
    Pointers, stride_* args and the integer args named in `divisible` are specialized as 16-divisible,
    as a launch with aligned tensors (and such values) is, except those the kernel exempts from it; `maxnreg` caps the registers a thread as the
    launch option of that name does.
    Also returns `loop_sass`: the SASS instructions of the kernel's largest loop body (the span of its
    longest backward branch) `loop_mix`: their count by opcode, for instructions-per-element budgets, `loop_vec16`: whether
    that loop has 16-byte global loads (LDG.128 or cp.async LDGSTS.128), `loop_waits` (loop_waits) and
    `smem`, the bytes of shared memory a program takes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    # as a launch specializes them: not the args the kernel exempts (do_not_specialize[_on_alignment])
    exempt = {p.name for p in fn.params if p.do_not_specialize or p.do_not_specialize_on_alignment}
    aligned = [n for n in names if n not in const and n not in exempt
               and (n.endswith("_ptr") or n.startswith("stride_") or n in divisible)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages}
                            | ({} if maxnreg is None else {"maxnreg": maxnreg}))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    body = loop_body(sass)
    waits = loop_waits(kernel.asm["ttgir"])
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "mma": "mma" in ptx, "cp_async": "cp.async" in ptx, "loop_sass": len(body),
            "loop_vec16": any(op.startswith("LDG") and ".128" in op for op in body),
            "loop_mix": dict(Counter(op.split(".")[0] for op in body).most_common()), "loop_waits": waits,
            "smem": kernel.metadata.shared}


def loop_waits(ttgir: str) -> list[int]:
    """The `num` of each cp.async wait inside the kernel's loops (TTGIR): how many of the latest copy
    groups a wait leaves in flight. 0 inside a loop waits for every copy issued, the next tiles' too, so
    none is in flight while the loop computes (the pipeline is empty)."""
    waits, depth, loops = [], 0, []   # loops: the brace depth outside each open scf.for
    for line in ttgir.splitlines():
        if loops and "ttg.async_wait" in line:
            waits.append(int(re.search(r"num = (\d+)", line).group(1)))
        if "scf.for" in line:
            loops.append(depth)
        depth += line.count("{") - line.count("}")   # regions; an attribute dict opens and closes on its line
        while loops and depth <= loops[-1]:
            loops.pop()
    return waits


def loop_body(sass: str) -> list[str]:
    """Opcodes (with modifiers) of the instructions in the largest loop of a cuobjdump -sass listing."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(tgt, addr) for addr, t in ins for tgt in [int(b, 16) for b in re.findall(r"BRA\s+0x([0-9a-f]+)", t)]
             if tgt < addr]
    if not loops:
        return []
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    return [re.sub(r"^@!?U?P[0-9T]\s+", "", t).split()[0] for a, t in ins if lo <= a <= hi]


def run_build(expr: str) -> dict:
    """Evaluate `expr` (a call returning build()'s dict, e.g. "m.f(3)" with `import ... as m` before a ';')
    in a fresh interpreter without TRITON_INTERPRET; skips the calling test when the wheel has no ptxas."""
    import pytest

    if not all(os.path.exists(os.path.join(tools_dir(), t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("no ptxas/cuobjdump in this Triton wheel")
    stmt, _, value = expr.rpartition(";")
    return run_uninterpreted(f"import json; {stmt}; print(json.dumps({value.strip()}))")


def run_uninterpreted(code: str):
    """Run python `code` in a fresh interpreter without TRITON_INTERPRET (the interpreter patches
    triton.language), from the repository root; the JSON its stdout's last line holds."""
    root = Path(__file__).resolve().parents[2]
    # the caller's PYTHONPATH stays behind the repository root (e.g. another Triton wheel to build with)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
