"""`lite kv_qparams`: static per-head KV-cache scales of format v1 from calibration statistics.

Per layer and kv head h, over the head's channels and all calibration tokens (post-RoPE keys,
values), with b = --kv-bits:
  asymmetric: scale = (max - min) / (2^b - 1), zero = -min / scale
  symmetric:  scale = absmax / (2^(b-1) - 1),  zero = 0
The format quantizes q = round(x / scale + zero) and dequantizes (q - zero) · scale, so the zero
point is stored in code units: LMDeploy's zero point `min` (x ≈ q · scale + min) is exactly
-zero · scale. Asymmetric codes span [0, 2^b - 1], symmetric ones [-(2^(b-1) - 1), 2^(b-1) - 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmdepot.convert.calibrate import CalibStats
from lmdepot.errors import ConvertError
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.kv_scales import write_kv_scales
from lmdepot.formats.manifest import FileEntry, Manifest, sha256_file

KV_BITS = (4, 8)
_FLOOR = np.float32(1e-8)  # a constant channel still gets a finite, positive scale


def head_params(stats: dict[str, np.ndarray], bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per kv head from (kv_heads, head_dim) max/min/absmax statistics."""
    if sym:
        scale = stats["absmax"].max(axis=-1).astype(np.float64) / (2 ** (bits - 1) - 1)
        return np.maximum(scale, _FLOOR), np.zeros_like(scale)
    hi = stats["max"].max(axis=-1).astype(np.float64)
    lo = stats["min"].min(axis=-1).astype(np.float64)
    scale = np.maximum((hi - lo) / (2**bits - 1), _FLOOR)
    return scale, -lo / scale


def layer_params(calib: CalibStats, layer: int, bits: int, sym: bool) -> np.ndarray:
    """(kv_heads, 4) = [k_scale, k_zero, v_scale, v_zero] of one layer, all heads."""
    cols = []
    for t in ("key", "value"):
        stats = {s: calib[f"{t}/{s}"][layer] for s in ("max", "min", "absmax")}
        cols += list(head_params(stats, bits, sym))
    return np.stack(cols, axis=1).astype(np.float32)


def kv_qparams(calib_dir: str | Path, workspace: str | Path, bits: int = 8, sym: bool = False,
               tp: int | None = None) -> Manifest:
    if bits not in KV_BITS:
        raise ConvertError(f"--kv-bits {bits}: must be 4 or 8")
    ws = Path(workspace)
    manifest = Manifest.read(ws)
    cfg = WorkspaceConfig.read(ws / layout.CONFIG_FILE)
    if tp is not None and tp != cfg.tensor_para_size:
        raise ConvertError(f"--tp {tp} differs from the workspace's tensor_para_size = {cfg.tensor_para_size};"
                           " the workspace decides how kv heads are split across ranks")
    calib = CalibStats(calib_dir)
    calib.check_model(cfg, what=f"workspace {ws}")
    hkv = cfg.kv_head_num // cfg.tensor_para_size
    written = []
    for i in range(cfg.num_layer):
        params = layer_params(calib, i, bits, sym)
        for rank in range(cfg.tensor_para_size):
            rel = layout.kv_scale_file(i, rank)
            write_kv_scales(ws / rel, params[rank * hkv:(rank + 1) * hkv])
            written.append(rel)
    # quant_policy is a serving default; static scales are only meaningful with that cache width.
    cfg.quant_policy = bits
    cfg.write(ws / layout.CONFIG_FILE)
    changed = set(written) | {layout.CONFIG_FILE}
    entries = [e for e in manifest.files if e.path not in changed]
    for rel in sorted(changed):
        layer, rank = layout.classify(rel)
        entries.append(FileEntry(rel, (ws / rel).stat().st_size, sha256_file(ws / rel), layer, rank))
    provenance = dict(manifest.provenance)
    provenance["kv_qparams"] = {"kv_bits": bits, "kv_sym": sym, "calib": calib.attrs.get("calib", {})}
    updated = Manifest(entries, provenance, manifest.format_version)
    updated.write(ws)
    return updated
