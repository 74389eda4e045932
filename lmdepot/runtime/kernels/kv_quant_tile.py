"""What both attention kernels over a quantized paged KV cache share (paged_decode_attention_quant.py,
prefill_attention_quant.py; schemes: runtime/ops/kv_quant.py): the parameter operands their launchers
pass, and the conversion of code tiles. Both kernels run on the raw codes and apply the quantizers as
vectors (per token or per channel), so nothing is dequantized element by element.

Codes become operands without an int-to-float instruction (quarter rate on an H100/H200): a code is
set into the mantissa of 1024 (fp16 1024 + code, exact) or of 2**23 (float32, then 2**23 off), by one
bitwise op or, on a GPU (ASM), one byte permute per two codes. int4 tiles on tensor cores hold the
head's channels as [even, odd] (`channels`): each byte is loaded twice, at columns i and D/2 + i, and
`nibbles` takes its low then its high nibble. (Splitting the bytes and interleaving the nibbles with
tl.join + tl.reshape was built wrong by Triton 3.6 on an H200, session 7: int4 prefill outputs 94%
off; the CPU interpreter got it right.)"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tests) runs no inline PTX: the conversions go the bitwise way there
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def channels(D: tl.constexpr, BITS: tl.constexpr):
    """The head's channels in the order a kernel's code tiles hold them: int4 [even..., odd...]
    (`nibbles`), int8 in order. q is loaded and the output stored at these channels."""
    j = tl.arange(0, D)
    if BITS == 4:
        j = 2 * (j % (D // 2)) + j // (D // 2)
    return j


@triton.jit
def nibbles(x):
    """int4 codes loaded as (rows, 2W) bytes with byte i at columns i and W + i: the low nibbles (even
    channels), then the high ones (odd channels)."""
    W: tl.constexpr = x.shape[1] // 2
    return (x >> ((tl.arange(0, x.shape[1]) // W) * 4).to(x.dtype)[None, :]) & 0xF


@triton.jit
def codes_f16(x, ASM: tl.constexpr):
    """Codes (uint8, at most 255) as fp16 1024 + code, exact: the code's bits in the mantissa of 1024;
    ASM: one byte permute per two codes."""
    if ASM:
        y = tl.inline_asm_elementwise(
            "prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        y = (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return y


@triton.jit
def codes_f32(x, ASM: tl.constexpr):
    """Codes (uint8, at most 255) as exact float32: the code in the mantissa of 2**23 (ASM: one byte
    permute a code), then 2**23 off."""
    if ASM:
        magic = tl.inline_asm_elementwise(
            "prmt.b32 $0, $4, 0x4B000000, 0x7540; prmt.b32 $1, $4, 0x4B000000, 0x7541; "
            "prmt.b32 $2, $4, 0x4B000000, 0x7542; prmt.b32 $3, $4, 0x4B000000, 0x7543;",
            "=r,=r,=r,=r,r", [x], dtype=tl.float32, is_pure=True, pack=4)
    else:
        magic = (x.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)
    return magic - 8388608.0


def param_operands(cache):
    """The parameter tensors both attention launchers pass for a QuantKVCache: (key scale, key zero,
    key min, key sink, value scale, value zero, the tensor whose strides are the per-channel ones).
    Without the channel key scheme the key min/sink slots are unused and get the value scales, and
    the per-channel strides are read off the value scales."""
    vs, vz = cache.scales[1], cache.zeros[1]
    if cache.key_channel:
        return cache.key_scale, vz, cache.key_min, cache.key_sink, vs, vz, cache.key_scale
    return cache.scales[0], cache.zeros[0], vs, vs, vs, vz, vs
