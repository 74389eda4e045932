"""KV-cache layouts and their memory accounting: float (quant_policy 0), int8 (8) and int4 (4).

Per layer, with N blocks of B tokens and hkv kv heads of head_dim d on this rank:

| policy | codes (K and V each) | per-token params (K and V each, online only) |
|---|---|---|
| 0 | (N, B, hkv, d) compute dtype | - |
| 8 | (N, B, hkv, d) uint8 | scale (N, B, hkv, d // g) fp16, zero (N, B, hkv, d // g) uint8 |
| 4 | (N, B, hkv, d // 2) uint8, two codes a byte | same as 8 |

g is the quantization group (default: the whole head). With the per-channel key scheme (`channel`,
the int4 default, ops/kv_quant.py) K has no per-token params; per block and kv head it keeps
key_scale and key_min (hkv, d) fp16 and the exact first token key_sink (hkv, d) fp16, i.e.
6 * d / B bytes per token and kv head. Static scales (`--kv-scales static`) keep
one fp32 (scale, zero) per kv head in memory instead of per-token parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmdepot.errors import FormatError
from lmdepot.formats import layout
from lmdepot.formats.kv_scales import read_kv_scales
from lmdepot.runtime.errors import RuntimeLoadError

QUANT_POLICIES = (0, 4, 8)
KV_SCALES = ("online", "static")
# Online schemes: plain = LMDeploy's per-token per-head; rotate = plain after a Hadamard rotation;
# channel = per-channel keys over each block + rotated per-token values (int4 only).
KV_SCHEMES = ("plain", "rotate", "channel")


@dataclass(frozen=True)
class KVSpec:
    """How one rank's KV cache stores a token; decided once per engine."""
    bits: int = 0            # 0: float cache in `dtype`
    dtype: torch.dtype = torch.float16
    group: int = 0           # channels per online quantizer (head_dim: LMDeploy's per-head scheme)
    rotate: bool = False     # Hadamard-rotate channels before online quantization
    static: bool = False
    key_channel: bool = False  # keys: per-channel ranges over each block (the `channel` scheme)

    def token_bytes(self, hkv: int, head_dim: int, block_size: int = 64) -> float:
        """Bytes of one token of one layer, K and V together. The per-block key params of the
        channel scheme are spread over the block's tokens (a fraction of a byte can remain)."""
        if self.bits == 0:
            return 2 * hkv * head_dim * torch.empty((), dtype=self.dtype).element_size()
        codes = hkv * head_dim * self.bits // 8
        params = 0 if self.static else hkv * (head_dim // self.group) * 3   # fp16 scale + uint8 zero
        if self.key_channel:   # fp16 scale, min and exact first-token row per block and channel
            return 2 * codes + params + hkv * head_dim * 6 / block_size
        return 2 * (codes + params)


def make_spec(quant_policy: int, dtype: torch.dtype, head_dim: int, kv_scales: str = "online",
              group: int | None = None, rotate: bool | None = None, scheme: str | None = None) -> KVSpec:
    """Validated KVSpec. Defaults (chosen by measurement, docs/quantization.md): int8 = LMDeploy's
    per-token per-head scheme (plain); int4 = per-channel keys + rotated per-token values (channel).
    `rotate` overrides the scheme's rotation of the per-token quantizers (values only for channel)."""
    if quant_policy not in QUANT_POLICIES:
        raise RuntimeLoadError(f"--quant-policy {quant_policy} is not one of 0, 4, 8")
    if kv_scales not in KV_SCALES:
        raise RuntimeLoadError(f"--kv-scales {kv_scales}: must be online or static")
    if scheme is not None and scheme not in KV_SCHEMES:
        raise RuntimeLoadError(f"--kv-scheme {scheme}: must be one of {', '.join(KV_SCHEMES)}")
    if scheme is not None and (quant_policy == 0 or kv_scales == "static"):
        raise RuntimeLoadError("--kv-scheme needs --quant-policy 8 or 4 with online scales")
    if scheme == "channel" and quant_policy != 4:
        raise RuntimeLoadError("--kv-scheme channel is an int4 scheme (--quant-policy 4)")
    if quant_policy == 0:
        if kv_scales == "static":
            raise RuntimeLoadError("--kv-scales static needs --quant-policy 8 or 4")
        return KVSpec(0, dtype)
    if kv_scales == "static":
        return KVSpec(quant_policy, dtype, head_dim, False, True)
    group = group or head_dim
    if head_dim % group or (quant_policy == 4 and group % 2):
        raise RuntimeLoadError(f"--kv-group-size {group} must divide head_dim {head_dim} (and be even for int4)")
    scheme = scheme or ("channel" if quant_policy == 4 else "plain")
    rotate = scheme != "plain" if rotate is None else rotate
    if rotate and head_dim & (head_dim - 1):
        raise RuntimeLoadError(f"the Hadamard KV rotation needs a power-of-two head_dim, got {head_dim}")
    return KVSpec(quant_policy, dtype, group, rotate, False, scheme == "channel")


def kv_block_bytes(cfg, block_size: int, spec: KVSpec) -> int:
    """Bytes of one KV block on one rank: K and V, every layer, this rank's kv heads."""
    _, hkv = cfg.heads_of_rank()
    return math.ceil(cfg.num_layer * block_size * spec.token_bytes(hkv, cfg.size_per_head, block_size))


@dataclass
class QuantKVCache:
    """One layer's quantized K and V; index 0 is K, 1 is V. Read by ops/kv_quant.py."""
    bits: int
    group: int
    rotate: bool
    static: bool
    codes: list[torch.Tensor]
    scales: list[torch.Tensor] = field(default_factory=list)
    zeros: list[torch.Tensor] = field(default_factory=list)
    static_params: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sym: bool = False
    key_channel: bool = False
    key_scale: torch.Tensor = None   # (N, hkv, d) fp16, channel scheme only
    key_min: torch.Tensor = None     # (N, hkv, d) fp16
    key_sink: torch.Tensor = None    # (N, hkv, d) fp16: each block's first key, exact


def allocate(spec: KVSpec, num_blocks: int, block_size: int, hkv: int, head_dim: int, static_params=None,
             sym: bool = False, device: torch.device | str = "cpu"):
    """(k_cache, v_cache) float tensors for policy 0, else a QuantKVCache. torch.empty: on CPU pages
    are committed only as blocks are written."""
    base = (num_blocks, block_size, hkv)
    if spec.bits == 0:
        return (torch.empty(*base, head_dim, dtype=spec.dtype, device=device),
                torch.empty(*base, head_dim, dtype=spec.dtype, device=device))
    width = head_dim if spec.bits == 8 else head_dim // 2
    cache = QuantKVCache(spec.bits, spec.group, spec.rotate, spec.static,
                         [torch.empty(*base, width, dtype=torch.uint8, device=device) for _ in range(2)], sym=sym)
    if spec.static:
        cache.static_params = [tuple(t.to(device) for t in pair) for pair in static_params]
    else:
        groups = head_dim // spec.group
        cache.scales = [torch.empty(*base, groups, dtype=torch.float16, device=device) for _ in range(2)]
        cache.zeros = [torch.empty(*base, groups, dtype=torch.uint8, device=device) for _ in range(2)]
    if spec.key_channel:   # K's per-token params above stay unused (never allocated pages on CPU)
        cache.key_channel = True
        cache.scales[0] = cache.zeros[0] = None
        cache.key_scale, cache.key_min, cache.key_sink = (
            torch.zeros(num_blocks, hkv, head_dim, dtype=torch.float16, device=device) for _ in range(3))
    return cache


def load_static_scales(workspace: Path, cfg, rank: int, bits: int):
    """Per layer [(k_scale, k_zero), (v_scale, v_zero)] fp32 (hkv,) tensors, and whether they are
    symmetric, from the workspace's scale files (format.md, KV-cache scale files)."""
    _, hkv = cfg.heads_of_rank()
    missing = [layout.kv_scale_file(i, rank) for i in range(cfg.num_layer)
               if not (workspace / layout.kv_scale_file(i, rank)).is_file()]
    if missing:
        raise RuntimeLoadError(f"--kv-scales static: {workspace} has no KV scale files ({missing[0]} missing);"
                               " write them with `lmdepot lite kv_qparams`")
    if cfg.quant_policy not in (0, bits):
        raise RuntimeLoadError(f"--kv-scales static: the workspace's scales are for int{cfg.quant_policy}"
                               f" (config.ini quant_policy), not --quant-policy {bits}")
    provenance = json.loads((workspace / layout.MANIFEST_FILE).read_text()).get("provenance", {})
    sym = bool(provenance.get("kv_qparams", {}).get("kv_sym", False))
    params = []
    for i in range(cfg.num_layer):
        try:
            p = torch.from_numpy(read_kv_scales(workspace / layout.kv_scale_file(i, rank), hkv))
        except FormatError as exc:
            raise RuntimeLoadError(f"{exc} (config.ini: {cfg.kv_head_num} kv heads over"
                                   f" {cfg.tensor_para_size} ranks)") from None
        params.append([(p[:, 0].clone(), p[:, 1].clone()), (p[:, 2].clone(), p[:, 3].clone())])
    return params, sym
