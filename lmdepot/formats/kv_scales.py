"""KV-cache scale files: raw little-endian fp32, shape (kv_heads_of_rank, 4).

Row h holds [k_scale, k_zero, v_scale, v_zero] of kv head h of that rank; the quantized value of x
is round(x / scale + zero) (asymmetric) or round(x / scale) with zero = 0 (symmetric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmdepot.errors import FormatError


def write_kv_scales(path: str | Path, params: np.ndarray) -> None:
    params = np.asarray(params, dtype="<f4")
    if params.ndim != 2 or params.shape[1] != 4:
        raise FormatError(f"{path}: kv scales must have shape (kv_heads, 4), got {params.shape}")
    Path(path).write_bytes(params.tobytes())


def read_kv_scales(path: str | Path, kv_heads: int) -> np.ndarray:
    raw = Path(path).read_bytes()
    if len(raw) != kv_heads * 4 * 4:
        raise FormatError(f"{path}: {len(raw)} bytes, expected {kv_heads * 16} for {kv_heads} kv heads")
    return np.frombuffer(raw, dtype="<f4").reshape(kv_heads, 4).copy()
