"""Triton kernel builds that happen inside a timed region.

Triton builds a kernel on the first launch of each new specialization (seconds for an attention
kernel; from its disk cache, much less). A build inside a timed run is compilation, not serving:
`record_builds` counts them (kernel name and seconds each) through Triton's JIT hooks, so a report
can say when its numbers include them (a fresh machine's first run)."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def record_builds():
    """Yields a list that fills with (kernel name, seconds) for each build while the block runs;
    Triton versions without `triton.knobs` hooks (before 3.4) leave it empty."""
    builds: list[tuple[str, float]] = []
    try:
        from triton import knobs
        hooks = knobs.runtime
        before, after = hooks.jit_cache_hook, hooks.jit_post_compile_hook
    except (ImportError, AttributeError):
        yield builds
        return
    started: dict = {}

    def kernel(fn) -> str:   # "prefill_attention._kernel": most kernels are called _kernel
        return f"{str(getattr(fn, 'module', '')).rsplit('.', 1)[-1]}.{fn.name}".lstrip(".")

    def on_build(*, key, fn, **kwargs):   # called just before a build; a true return would skip it
        started[(kernel(fn), str(key))] = time.perf_counter()
        return before(key=key, fn=fn, **kwargs) if before else None

    def on_built(*, key, fn, **kwargs):
        t0 = started.pop((kernel(fn), str(key)), None)
        builds.append((kernel(fn), time.perf_counter() - t0 if t0 is not None else 0.0))
        return after(key=key, fn=fn, **kwargs) if after else None

    hooks.jit_cache_hook, hooks.jit_post_compile_hook = on_build, on_built
    try:
        yield builds
    finally:
        hooks.jit_cache_hook, hooks.jit_post_compile_hook = before, after


def summary(builds: list[tuple[str, float]]) -> dict:
    """{"count", "seconds", "kernels": {name: count}} of record_builds' list."""
    kernels: dict[str, int] = {}
    for name, _ in builds:
        kernels[name] = kernels.get(name, 0) + 1
    return {"count": len(builds), "seconds": sum(s for _, s in builds), "kernels": kernels}


def describe(summary_: dict | None) -> str | None:
    """"includes N Triton kernel builds, X s: kernel xn, ..." for a report line; None without builds."""
    if not summary_ or not summary_.get("count"):
        return None
    kernels = ", ".join(f"{k} x{n}" for k, n in summary_["kernels"].items())
    return f"includes {summary_['count']} Triton kernel builds, {summary_['seconds']:.1f} s: {kernels}"
