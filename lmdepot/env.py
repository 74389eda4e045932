"""`lmdepot check_env`: what this machine offers lmdepot, as one report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

EXTRAS = {
    "gpu": ["triton"],
    "serve": ["fastapi", "uvicorn", "prometheus-client"],
    "s3": ["s3fs"],
    "plot": ["matplotlib"],
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from lmdepot import __version__
    from lmdepot.convert.gguf import cache_dir
    from lmdepot.registry.core import default_registry_url

    info: dict = {
        "lmdepot": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "gpus": [],
        "nccl": None,
        "extras": {name: {d: _version(d) for d in dists} for name, dists in EXTRAS.items()},
        "registry": default_registry_url(),
        "cache_dir": str(cache_dir()),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("LMDEPOT_", "NCCL_", "CUDA_VISIBLE"))},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
        info["driver"] = _driver_version()
    try:
        import torch.distributed as dist

        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() and \
            torch.cuda.is_available() else ("built in, no GPU" if dist.is_nccl_available() else "not available")
        info["gloo"] = dist.is_gloo_available()
    except Exception as exc:  # noqa: BLE001 - report, never fail the report
        info["nccl"] = f"unknown ({type(exc).__name__})"
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def render(info: dict) -> str:
    lines = [f"lmdepot          {info['lmdepot']}", f"python           {info['python']}",
             f"platform         {info['platform']}", f"torch            {info['torch']}",
             f"triton           {info['triton'] or 'not installed'}",
             f"cuda             {'available, runtime ' + str(info['cuda_runtime']) if info['cuda_available'] else 'no GPU visible'}"]
    if info.get("driver"):
        lines.append(f"driver           {info['driver']}")
    for g in info["gpus"]:
        lines.append(f"gpu {g['index']}            {g['name']}, {g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')},"
                     f" {g['multiprocessors']} SMs")
    lines.append(f"nccl             {info['nccl']}")
    lines.append(f"gloo             {'available' if info.get('gloo') else 'not available'}")
    for name, dists in info["extras"].items():
        shown = ", ".join(f"{d} {v}" if v else f"{d} missing" for d, v in dists.items())
        lines.append(f"extra {name:<10} {shown}")
    lines.append(f"registry         {info['registry']}")
    lines.append(f"cache dir        {info['cache_dir']}")
    for k, v in sorted(info["env"].items()):
        lines.append(f"env              {k}={v}")
    return "\n".join(lines) + "\n"
