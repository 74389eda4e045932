"""`lmdepot inspect`: a workspace's config, per-layer/rank size table and totals."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from lmdepot.formats.config import WorkspaceConfig, model_keys
from lmdepot.formats.layout import CONFIG_FILE
from lmdepot.formats.manifest import Manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def inspect_workspace(workspace: str | Path, verify: bool = False, as_json: bool = False) -> str:
    manifest = Manifest.read(workspace)
    cfg = WorkspaceConfig.read(Path(workspace) / CONFIG_FILE)
    if verify:
        manifest.verify(workspace)
    tp = cfg.tensor_para_size
    per_layer: dict[int, list[int]] = defaultdict(lambda: [0] * tp)
    per_rank = [0] * tp
    shared = 0
    for e in manifest.files:
        if e.rank is None:
            shared += e.size
            continue
        per_rank[e.rank] += e.size
        if e.layer is not None:
            per_layer[e.layer][e.rank] += e.size
    total = sum(e.size for e in manifest.files)
    if as_json:
        body = {"config": {k: getattr(cfg, k) for k in model_keys()} | {"extra": cfg.extra},
                "manifest_sha256": manifest.digest, "files": len(manifest.files), "total_bytes": total,
                "rank_bytes": per_rank, "shared_bytes": shared,
                "layer_bytes": {str(i): per_layer[i] for i in sorted(per_layer)},
                "provenance": manifest.provenance, "verified": verify}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"
    out = io.StringIO()
    out.write(f"workspace {workspace}  (format v{manifest.format_version}, manifest sha256:{manifest.digest})\n\n")
    out.write(cfg.to_ini() + "\n")
    out.write("layer  " + "  ".join(f"rank{r} MiB".rjust(11) for r in range(tp)) + "\n")
    for i in sorted(per_layer):
        out.write(f"{i:>5}  " + "  ".join(_mib(n).rjust(11) for n in per_layer[i]) + "\n")
    out.write("total  " + "  ".join(_mib(n).rjust(11) for n in per_rank) + "\n\n")
    out.write(f"files: {len(manifest.files)}   shared (config, tokenizer): {_mib(shared)} MiB"
              f"   total: {_mib(total)} MiB\n")
    src = manifest.provenance.get("source", {})
    out.write(f"source: {src.get('kind')} {src.get('name')} sha256:{src.get('sha256')}\n")
    if verify:
        out.write(f"verify: OK, all {len(manifest.files)} digests match\n")
    return out.getvalue()
