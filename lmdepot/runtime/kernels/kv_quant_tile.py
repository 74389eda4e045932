"""`@triton.jit` helpers (and the launchers' parameter choice) shared by the attention kernels over a quantized paged KV cache
(paged_decode_attention_quant.py, prefill_attention_quant.py): one tile of N cached keys or values,
dequantized in registers right after the load (schemes: runtime/ops/kv_quant.py).

The caller computes each key's element offsets, so a tile may be one page (decode: scalar block) or
N keys gathered through the block table across pages (prefill: one block per key). Offsets are
(N, 1) tensors or scalars that broadcast against the (N, BLOCK_D) tile:
- c_row: codes of the key at kv head kvh (block * c_b + slot * c_s + kvh * c_h);
- p_row: its per-token params (scale, zero), same indexing with the param strides;
- ch_row: the per-channel key params of its block and kv head (block * ch_b + kvh * ch_h).
"""

from __future__ import annotations

import triton
import triton.language as tl


def param_operands(cache):
    """The parameter tensors both attention launchers pass for a QuantKVCache: (key scale, key zero,
    key min, key sink, value scale, value zero, the tensor whose strides are the per-channel ones).
    Without the channel key scheme the key min/sink slots are unused and get the value scales, and
    the per-channel strides are read off the value scales."""
    vs, vz = cache.scales[1], cache.zeros[1]
    if cache.key_channel:
        return cache.key_scale, vz, cache.key_min, cache.key_sink, vs, vz, cache.key_scale
    return cache.scales[0], cache.zeros[0], vs, vs, vs, vz, vs


@triton.jit
def codes_tile(ptr, c_row, offs_d, mask, row_mask, BITS: tl.constexpr, WORDS: tl.constexpr):
    """(N, BLOCK_D) codes as float32; int4: two per byte, channel 2i in the low nibble. WORDS: whole
    32-bit words of codes are loaded (row_mask (N, 1): the keys to load) and split into channels in
    registers (byte loads in the dot operand's layout made the prefill kernel 7x slower than the
    float one on an H200); every row must then hold BLOCK_D channels."""
    if WORDS:
        PER_WORD: tl.constexpr = 32 // BITS
        offs_w = tl.arange(0, offs_d.shape[0] // PER_WORD)
        # c_row is a byte offset, 4-aligned for power-of-two heads of 8+ channels
        words = tl.load((ptr + c_row).to(tl.pointer_type(tl.int32)) + offs_w[None, :], mask=row_mask, other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        code = tl.reshape(code, (words.shape[0], offs_d.shape[0]))
    elif BITS == 4:
        byte = tl.load(ptr + c_row + offs_d[None, :] // 2, mask=mask, other=0)
        code = (byte >> ((offs_d[None, :] % 2) * 4).to(tl.uint8)) & 0xF
    else:
        code = tl.load(ptr + c_row + offs_d[None, :], mask=mask, other=0)
    return code.to(tl.float32)


@triton.jit
def per_token_tile(c_ptr, s_ptr, z_ptr, c_row, p_row, offs_d, mask, row_mask, BITS: tl.constexpr,
                   GROUP: tl.constexpr, WORDS: tl.constexpr):
    """x^ = (code - zero) * scale, one (fp16 scale, uint8 zero) per token, kv head and GROUP channels.
    Masked elements come out 0 (code, zero and scale all load as 0). row_mask: codes_tile's."""
    code = codes_tile(c_ptr, c_row, offs_d, mask, row_mask, BITS, WORDS)
    p = p_row + offs_d[None, :] // GROUP
    scale = tl.load(s_ptr + p, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + p, mask=mask, other=0).to(tl.float32)
    return (code - zero) * scale


@triton.jit
def channel_key_tile(c_ptr, s_ptr, min_ptr, sink_ptr, c_row, ch_row, first, offs_d, mask, row_mask, ch_mask,
                     BITS: tl.constexpr, WORDS: tl.constexpr):
    """x^ = code * scale + min with (fp16 scale, fp16 min) per block, kv head and channel; a block's
    first key (`first`, (N, 1) or scalar) is read exactly from the block's fp16 sink row. ch_mask
    masks the param loads ((1, BLOCK_D) when ch_row is one block's, else the tile's mask)."""
    code = codes_tile(c_ptr, c_row, offs_d, mask, row_mask, BITS, WORDS)
    ch = ch_row + offs_d[None, :]
    scale = tl.load(s_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)
    lo = tl.load(min_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)
    sink = tl.load(sink_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)
    return tl.where(first, sink, code * scale + lo)
