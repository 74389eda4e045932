"""Torch reference of the quantized KV cache: quantize on store, dequantize on read.

Online scheme (LMDeploy >= 0.4's quant_policy 4/8): every token, kv head and group of `group`
channels gets its own asymmetric quantizer
    lo = min(x, 0), hi = max(x, 0), scale = fp16((hi - lo) / qmax), zero = round(-lo / scale)
    q = clamp(round(x / scale) + zero, 0, qmax),  x^ = (q - zero) * scale
with qmax = 2^bits - 1. Including 0 in the range makes the zero point an exact code (one byte),
so the parameters cost 3 bytes (fp16 scale + uint8 zero) instead of 4; on real key/value vectors
(many channels of both signs) the range is the plain min/max anyway.

Optionally the channels are first rotated by an orthonormal Hadamard matrix (`rotate`): it spreads
outlier channels over the whole head, so one per-token scale fits all channels much better. The
read path rotates back (H is symmetric and H @ H = I); a kernel can instead rotate the query and
the attention output, since q.k = (qH).(kH).

Static scheme (`--kv-scales static`): one fp32 (scale, zero) per layer, kv head and K/V from the
workspace's scale files; no per-token parameters are stored.

Per-channel key scheme (`key_channel`, the int4 default; KIVI's idea on a paged cache): keys have
a few channels that are large for every token, so a per-token range is set by those and the other
channels get few codes. Instead each cache block, kv head and channel gets one asymmetric range
over the block's tokens (fp16 scale and fp16 minimum, x^ = q * scale + min). The block's first
token is kept exact (fp16 row `key_sink`): token 0 of a sequence is the attention sink, whose
keys are far from the others and would otherwise set block 0's ranges. Appending to a block that
is not full re-derives its ranges from its dequantized tokens plus the new ones and requantizes
it; only the sequence's own last block is ever touched (full blocks, the only ones prefix caching
shares, are never written again). Values stay per token (rotated), as in the rotated scheme.

int4 codes are packed two per byte along head_dim: byte i = code[2i] | code[2i+1] << 4.
"""

from __future__ import annotations

import functools
import math

import torch

SCALE_FLOOR = 2.0 ** -20   # an all-zero group still gets a finite, positive fp16 (subnormal) scale


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two), float32, symmetric."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@functools.lru_cache(maxsize=16)
def hadamard_on(n: int, device: str) -> torch.Tensor:
    """hadamard(n) on a device, copied once (kernels and CUDA graphs must not copy it every step)."""
    return hadamard(n).to(device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., d) codes in 0..15 -> (..., d // 2) uint8."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(..., d // 2) uint8 -> (..., d) uint8 codes."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def quantize_online(x: torch.Tensor, bits: int, group: int):
    """x (T, H, D) -> codes (T, H, D) uint8, scale (T, H, D // group) fp16, zero (T, H, D // group) uint8."""
    t, h, d = x.shape
    qmax = 2 ** bits - 1
    g = x.float().reshape(t, h, d // group, group)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=SCALE_FLOOR).half()
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(g / s[..., None]) + zero[..., None]).clamp(0, qmax)
    return q.reshape(t, h, d).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_online(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """Inverse of quantize_online: codes (N, H, D), params (N, H, G) -> (N, H, D) in dtype."""
    n, h, d = q.shape
    g = q.float().reshape(n, h, scale.shape[-1], -1)
    x = (g - zero.float()[..., None]) * scale.float()[..., None]
    return x.reshape(n, h, d).to(dtype)


def static_code_range(bits: int, sym: bool) -> tuple[int, int, int]:
    """(lowest code, highest code, offset added before storing as unsigned)."""
    if sym:
        m = 2 ** (bits - 1) - 1
        return -m, m, 2 ** (bits - 1)
    return 0, 2 ** bits - 1, 0


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool):
    """x (T, H, D), per-head scale/zero (H,) fp32 -> stored unsigned codes (T, H, D) uint8."""
    lo, hi, off = static_code_range(bits, sym)
    q = torch.round(x.float() / scale[:, None] + zero[:, None]).clamp(lo, hi)
    return (q + off).to(torch.uint8)


def dequantize_static(q: torch.Tensor, scale, zero, bits: int, sym: bool, dtype) -> torch.Tensor:
    _, _, off = static_code_range(bits, sym)
    return ((q.float() - off - zero[:, None]) * scale[:, None]).to(dtype)


def quantize_channel(x: torch.Tensor, bits: int):
    """x (n, H, D) tokens of one block (n >= 1) -> codes (n, H, D) uint8, scale (H, D) fp16, min (H, D)
    fp16: one range per head and channel over the n tokens."""
    qmax = 2 ** bits - 1
    x = x.float()
    lo = x.amin(0).half()
    scale = ((x.amax(0) - lo.float()) / qmax).clamp(min=SCALE_FLOOR).half()
    q = torch.round((x - lo.float()) / scale.float()).clamp(0, qmax)
    return q.to(torch.uint8), scale, lo


def dequantize_channel(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Codes (..., H, D) with per-(H, D) scale and min broadcast over the leading dims -> float32."""
    return q.float() * scale.float() + lo.float()


def _codes(cache, kv: int, blocks):
    q = cache.codes[kv][blocks]
    return unpack_int4(q) if cache.bits == 4 else q


def _store_keys_channel(k: torch.Tensor, cache, slot_mapping: torch.Tensor) -> None:
    """Per-channel keys: requantize every block that receives new tokens (see the module doc).
    A block's new tokens are contiguous and its older ones are offsets 0.. first new - 1."""
    bs = cache.codes[0].shape[1]
    blocks, offs = slot_mapping // bs, slot_mapping % bs
    for blk in blocks.unique().tolist():
        sel = blocks == blk
        first, last = int(offs[sel].min()), int(offs[sel].max())
        rows = torch.empty(last + 1, *k.shape[1:], dtype=torch.float32, device=k.device)
        if first > 0:   # the older tokens, as the cache holds them
            rows[:first] = dequantize_channel(_codes(cache, 0, blk)[:first], cache.key_scale[blk],
                                              cache.key_min[blk])
            rows[0] = cache.key_sink[blk].float()
        rows[offs[sel]] = k[sel].float()
        if first == 0:
            cache.key_sink[blk] = rows[0].half()
        q = torch.zeros(bs, *k.shape[1:], dtype=torch.uint8, device=k.device)
        if last > 0:
            q[1:last + 1], cache.key_scale[blk], cache.key_min[blk] = quantize_channel(rows[1:], cache.bits)
        cache.codes[0][blk] = pack_int4(q) if cache.bits == 4 else q


def _gather_keys_channel(cache, slots: torch.Tensor) -> torch.Tensor:
    bs = cache.codes[0].shape[1]
    blocks, offs = slots // bs, slots % bs
    codes = cache.codes[0].view(-1, *cache.codes[0].shape[2:])[slots]
    if cache.bits == 4:
        codes = unpack_int4(codes)
    x = dequantize_channel(codes, cache.key_scale[blocks], cache.key_min[blocks])
    return torch.where((offs == 0)[:, None, None], cache.key_sink[blocks].float(), x)


def _encode(x: torch.Tensor, cache, kv: int):
    """Codes (and per-token params) of new keys (kv = 0) or values (kv = 1)."""
    if cache.static:
        scale, zero = cache.static_params[kv]
        return quantize_static(x, scale, zero, cache.bits, cache.sym), None, None
    if cache.rotate:
        x = x.float() @ hadamard_on(x.shape[-1], x.device)
    return quantize_online(x, cache.bits, cache.group)


def store_kv_quant(k: torch.Tensor, v: torch.Tensor, cache, slot_mapping: torch.Tensor) -> None:
    """Quantize new k/v (T, hkv, d) into their slots of a QuantKVCache (see runtime/kv_cache.py)."""
    for kv, x in enumerate((k, v)):
        if kv == 0 and cache.key_channel:
            _store_keys_channel(x, cache, slot_mapping)
            continue
        q, scale, zero = _encode(x, cache, kv)
        if cache.bits == 4:
            q = pack_int4(q)
        codes = cache.codes[kv]
        codes.view(-1, *codes.shape[2:])[slot_mapping] = q
        if scale is not None:
            cache.scales[kv].view(-1, *cache.scales[kv].shape[2:])[slot_mapping] = scale
            cache.zeros[kv].view(-1, *cache.zeros[kv].shape[2:])[slot_mapping] = zero


def gather_kv_quant(cache, slots: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values (n, hkv, d) of the given cache slots."""
    out = []
    for kv in (0, 1):
        if kv == 0 and cache.key_channel:
            out.append(_gather_keys_channel(cache, slots).to(dtype))
            continue
        codes = cache.codes[kv]
        q = codes.view(-1, *codes.shape[2:])[slots]
        if cache.bits == 4:
            q = unpack_int4(q)
        if cache.static:
            scale, zero = cache.static_params[kv]
            x = dequantize_static(q, scale, zero, cache.bits, cache.sym, torch.float32)
        else:
            s, z = cache.scales[kv], cache.zeros[kv]
            x = dequantize_online(q, s.view(-1, *s.shape[2:])[slots], z.view(-1, *z.shape[2:])[slots],
                                  torch.float32)
            if cache.rotate:
                x = x @ hadamard_on(x.shape[-1], x.device)
        out.append(x.to(dtype))
    return out[0], out[1]
