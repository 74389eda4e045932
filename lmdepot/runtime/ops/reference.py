"""Torch reference ops. Numerics follow HF transformers' Llama step by step (same dtypes, same order
of casts) so that fp32 results match it closely and bf16 greedy decoding matches it token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdepot.formats.int4 import dequantize_int4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add of a sublayer fused with the next norm.
    x may be float32 (a tensor-parallel sum): it is rounded to the residual's dtype first, as a
    single-rank linear's output would be."""
    h = x.to(residual.dtype) + residual
    return rms_norm(h, weight, eps), h


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions[:, None].float() * inv_freq.float().to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """x: (T, heads, head_dim); rotates the first rot_dim dims, HF 'rotate_half' convention."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype=None) -> torch.Tensor:
    """weight is (out, in), as F.linear wants it: the loader transposes the workspace's (in, out) once.
    out_dtype (float32): the sums before any rounding to x's dtype (tensor-parallel partial sums)."""
    if out_dtype is None or out_dtype == x.dtype:
        return F.linear(x, weight, bias)
    if x.is_cuda:   # cuBLAS accumulates in fp32 anyway: keep its sums as they are
        y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=out_dtype).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x.to(out_dtype), weight.to(out_dtype))
    return y if bias is None else y + bias.to(out_dtype)


def linear_int4(x, weight, in_features, bias=None, out_dtype=None):
    """weight: the workspace tensors {"qweight", "scales", "zeros"} (formats/int4.py). Dequantizing per
    call keeps only int4 bytes resident; on the GPU the kernels take a repacked copy instead."""
    w = dequantize_int4(weight["qweight"], weight["scales"], weight["zeros"], in_features, dtype=x.dtype)
    out = x @ w if out_dtype is None else x.to(out_dtype) @ w.to(out_dtype)
    return out if bias is None else out + bias.to(out.dtype)


def quant_per_token(x: torch.Tensor):
    """Dynamic symmetric int8 per token (row): (codes int8, scales float32 (...,)). Rounds half up,
    floor(v + 0.5), exactly as the Triton kernel does, so both give the same codes."""
    y = x.to(torch.float32)
    amax = y.abs().amax(dim=-1).clamp(min=1e-8)
    # Tensor-by-tensor divisions: torch turns a division by (or of) a Python scalar into a multiply by
    # a reciprocal, which can differ from the kernel's IEEE division in the last bit.
    qmax = torch.full_like(amax, 127.0)
    q = torch.floor(y * (qmax / amax)[..., None] + 0.5).clamp(-127, 127).to(torch.int8)
    return q, amax / qmax


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """rms_norm, then quant_per_token: the W8A8 input of q/k/v and gate/up."""
    return quant_per_token(rms_norm(x, weight, eps))


def int_mm(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """Exact int32 a (M, K) int8 @ b_nk (N, K)^T. torch._int_mm on CUDA where its shape rules allow;
    else float64, exact for K < 2^53 / 127^2."""
    if a.is_cuda and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b_nk.shape[0] % 8 == 0:
        try:
            return torch._int_mm(a, b_nk.t())
        except RuntimeError:  # a GPU or build without cuBLASLt int8
            pass
    return (a.double() @ b_nk.double().t()).to(torch.int32)


def linear_w8a8(xq, x_scales, qweight, w_scales, bias, dtype):
    """xq (..., K) int8 with per-token scales; qweight (N, K) int8 with per-channel scales -> (..., N) dtype."""
    acc = int_mm(xq.reshape(-1, xq.shape[-1]), qweight)
    out = acc.float() * x_scales.reshape(-1, 1) * w_scales[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype).view(*xq.shape[:-1], qweight.shape[0])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over the fused gate/up projection's output (..., 2·I), rounded as HF does."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_linear(gate_up, weight, bias=None, out_dtype=None):
    return linear(silu_mul(gate_up), weight, bias, out_dtype)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Caches are (blocks, block_size, kv_heads, head_dim); a slot is block * block_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def rope_store_kv(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping):
    """Rotate q and k, store k and v: the float-cache attention prologue as one op (one kernel on GPU).
    Without caches (None: a quantized cache, which stores k and v itself) it only rotates."""
    q, k = apply_rope(q, cos, sin, rot_dim), apply_rope(k, cos, sin, rot_dim)
    if k_cache is not None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def _slots(s, bs: int) -> torch.Tensor:
    return (s.block_table.long()[:, None] * bs + torch.arange(bs, device=s.block_table.device)).reshape(-1)[:s.ctx_len]


def paged_attention(q, k, v, k_cache, v_cache, ctx, scale):
    """q: (T, hq, d) new queries; k/v: (T, hkv, d) new keys, already stored. Returns (T, hq, d)."""
    bs = ctx.block_size
    kc, vc = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])

    def kv_of(s):
        if s.ctx_len == s.q_len:  # nothing cached: attend over the fresh k/v, like a plain prefill
            return k[s.q_start:s.q_start + s.q_len], v[s.q_start:s.q_start + s.q_len]
        slots = _slots(s, bs)
        return kc[slots], vc[slots]

    return _attend(q, ctx, scale, kv_of, gqa=q.shape[1] != k.shape[1])


def paged_attention_quant(q, k, v, cache, ctx, scale):
    """Like paged_attention over a QuantKVCache. Every key and value, the new ones included, is read
    back dequantized from the cache, as a decode step reads it, so the quantization error is what
    the model sees."""
    from lmdepot.runtime.ops.kv_quant import gather_kv_quant

    return _attend(q, ctx, scale, lambda s: gather_kv_quant(cache, _slots(s, ctx.block_size), q.dtype),
                   gqa=q.shape[1] != k.shape[1])


def _attend(q, ctx, scale, kv_of, gqa: bool):
    out = torch.empty_like(q)
    for s in ctx.seqs:
        qs = q[s.q_start:s.q_start + s.q_len]
        ks, vs = kv_of(s)
        mask, causal = None, s.q_len > 1
        window = ctx.sliding_window
        if (causal and s.ctx_len > s.q_len) or (window and s.ctx_len > window):
            # Queries sit at the end of the context: query i sees keys up to ctx_len - q_len + i,
            # and with a sliding window only the last `window` of them.
            qpos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)[:, None]
            kpos = torch.arange(s.ctx_len, device=q.device)[None, :]
            mask = kpos <= qpos
            if window:
                mask &= kpos > qpos - window
            causal = False
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=gqa)
        out[s.q_start:s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out
