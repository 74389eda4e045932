"""A Llama-family decoder (Llama, Mistral, Qwen2, InternLM2) built from config.ini and one rank's tensors.

forward(tokens, positions) works on a flat batch of tokens from many sequences; how they map onto
sequences and KV blocks comes from the step's Context (see context.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.runtime import ops, tp
from lmdepot.runtime.context import get_context
from lmdepot.runtime.loader import RankWeights


class Linear(nn.Module):
    """Plain (out, in) weight, int4 group-quantized weight (on the GPU repacked once for the kernels,
    ops/triton_ops.int4_layout), or int8 (W8A8)."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, bias: bool = True):
        super().__init__()
        q = tensors.get(f"{prefix}.qweight")
        self.int8 = q is not None and q.dtype == torch.int8
        self.int4 = q is not None and not self.int8
        if self.int8:
            self.qweight = q.t().contiguous()   # (out, in): both GEMM operands K-contiguous
            self.scales = tensors[f"{prefix}.scales"].float()
            self.dtype = dtype
        elif self.int4:
            w = {"qweight": q, "scales": tensors[f"{prefix}.scales"], "zeros": tensors[f"{prefix}.zeros"]}
            if q.is_cuda:   # one copy, in the GPU kernels' layout (the workspace tensors are dropped)
                from lmdepot.runtime.ops.triton_ops import int4_layout

                w = int4_layout(w)
            self.int4_weight = w
            # its tensors as attributes too: runner.model_bytes counts a module's tensor attributes
            self.qweight, self.scales, self.zeros = w.get("qt", q), w["scales"], w["zeros"]
            self.in_features = None  # set by the owner: padded rows cannot tell it
        else:
            self.weight = tensors[f"{prefix}.weight"].t().to(dtype).contiguous()
        b = tensors.get(f"{prefix}.bias") if bias else None
        self.bias = None if b is None else b.to(dtype)

    def forward(self, x, out_dtype=None, gated: bool = False) -> torch.Tensor:
        """out_dtype=float32: the sums unrounded (a row-parallel rank's partial, see reduce_partial).
        gated: x is a fused gate/up output and the input is silu(gate) * up (a plain weight takes it
        in one op, which a kernel may fuse)."""
        if gated and (self.int8 or self.int4):
            x, gated = ops.silu_mul(x), False
        if self.int8:
            # x comes already quantized, (codes, per-token scales), from the fused norm; else quantize here.
            xq, xs = x if isinstance(x, tuple) else ops.quant_per_token(x)
            return ops.linear_w8a8(xq, xs, self.qweight, self.scales, self.bias, out_dtype or self.dtype)
        if self.int4:
            return ops.linear_int4(x, self.int4_weight, self.in_features, self.bias, out_dtype)
        if gated:
            return ops.silu_mul_linear(x, self.weight, self.bias, out_dtype)
        return ops.linear(x, self.weight, self.bias, out_dtype)

    @property
    def plain(self) -> bool:
        return not (self.int8 or self.int4)

    def forward_normed(self, x, residual, norm_weight, eps: float):
        """(self(rms_norm(x + residual) * norm_weight), x + residual) for a plain weight, in one op
        (ops.add_rms_norm_linear), which a kernel may fuse."""
        return ops.add_rms_norm_linear(x, residual, norm_weight, eps, self.weight, self.bias)


class Partial:
    """A rank's float32 row-parallel partial whose sum over the ranks is left to the next norm, which
    does both in one kernel (tp.all_reduce_add_rms_norm); `summed()` where a plain sum is needed."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def summed(self) -> torch.Tensor:
        return tp.all_reduce(self.x)


def reduce_partial(linear: Linear, x, defer: bool = True, gated: bool = False):
    """A row-parallel linear summed over the ranks. With several ranks each one's partial stays in
    float32 through the all-reduce and is rounded once, by the next add_rms_norm, as one rank's
    output would be: tp=2 then differs from tp=1 only in the float32 summation order, not by an
    extra rounding of every partial to bf16/fp16. defer: return a Partial for the next norm to sum.
    gated: see Linear.forward."""
    if tp.world_size() == 1:
        return linear(x, gated=gated)
    partial = linear(x, torch.float32, gated=gated)
    return Partial(partial) if defer else tp.all_reduce(partial)


def _linear(t, prefix, dtype, in_features, bias=True) -> Linear:
    lin = Linear(t, prefix, dtype, bias)
    lin.in_features = in_features
    return lin


def _fused_linear(t, prefixes, dtype, in_features) -> Linear:
    """One linear for several that read the same input (gate and up): their output columns side by
    side, so decode reads the input once and launches one GEMV. Every workspace tensor of a linear
    (weight, qweight, scales, zeros, bias) has the output dim last."""
    merged = {}
    for key in ("weight", "qweight", "scales", "zeros", "bias"):
        parts = [t.get(f"{p}.{key}") for p in prefixes]
        if all(x is not None for x in parts):
            merged[f"fused.{key}"] = torch.cat(parts, dim=-1)
    return _linear(merged, "fused", dtype, in_features)


def rope_inv_freq(cfg: WorkspaceConfig) -> torch.Tensor:
    dim = cfg.rotary_embedding or cfg.size_per_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, factor = cfg.rope_scaling_type, cfg.rope_scaling_factor
    if kind == "linear":
        inv = inv / factor
    elif kind == "llama3":
        old = cfg.original_max_position_embeddings
        low_wl, high_wl = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def logn_factors(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Qwen's log-n attention scaling: the query at 0-based position p is multiplied by
    log(p + 1) / log(max_len) once p + 1 > max_len (the training length), else by 1."""
    n = (positions + 1).to(torch.float32)
    return torch.where(n > max_len, torch.log(n) / math.log(max_len), torch.ones_like(n))


def dynamic_ntk_inv_freq(cfg: WorkspaceConfig, seq_len: int) -> torch.Tensor:
    """HF's dynamic NTK frequencies for a sequence of seq_len > max_position_embeddings tokens.

    Computed with the same tensor dtypes as transformers (seq_len is an int64 tensor there), so the
    float32 rounding matches too.
    """
    dim = cfg.rotary_embedding or cfg.size_per_head
    n = torch.tensor(seq_len, dtype=torch.int64)
    n = torch.maximum(n, torch.tensor(cfg.max_position_embeddings, dtype=torch.int64))
    factor = cfg.rope_scaling_factor
    base = cfg.rope_theta * ((factor * n / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class Attention(nn.Module):
    def __init__(self, cfg: WorkspaceConfig, t: dict, dtype: torch.dtype):
        super().__init__()
        self.hq, self.hkv = cfg.heads_of_rank()
        self.d = cfg.size_per_head
        self.rot_dim = cfg.rotary_embedding or self.d
        self.scale = self.d ** -0.5
        self.w_qkv = _linear(t, layout.W_QKV, dtype, cfg.hidden_units)
        self.wo = _linear(t, layout.W_O, dtype, self.hq * self.d, bias=False)
        b = t.get(f"{layout.W_O}.bias")
        self.wo_bias = None if b is None else b.to(dtype)  # full on every rank: added once, after the reduce
        self.k_cache = self.v_cache = None
        self.kv_quant = None   # a QuantKVCache when quant_policy is 4 or 8

    def forward(self, qkv, cos, sin):
        """qkv: w_qkv of the normed input, which the layer computes (with the norm, see norm_linear)."""
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(-1, self.hq, self.d), k.view(-1, self.hkv, self.d), v.view(-1, self.hkv, self.d)
        ctx = get_context()
        if ctx.logn is not None:  # use_logn_attn: queries past the training length are sharpened
            q = q * ctx.logn[:, None, None].to(q.dtype)
        if self.kv_quant is not None:
            q, k = ops.rope_store_kv(q, k, v, cos, sin, self.rot_dim, None, None, ctx.slot_mapping)   # rope only
            ops.store_kv_quant(k, v, self.kv_quant, ctx.slot_mapping)
            o = ops.paged_attention_quant(q, k, v, self.kv_quant, ctx, self.scale)
        else:  # rope and the cache write in one op (one kernel on GPU)
            q, k = ops.rope_store_kv(q, k, v, cos, sin, self.rot_dim, self.k_cache, self.v_cache, ctx.slot_mapping)
            o = ops.paged_attention(q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
        out = reduce_partial(self.wo, o.reshape(o.shape[0], -1), defer=self.wo_bias is None)
        return out if self.wo_bias is None else out + self.wo_bias


class FeedForward(nn.Module):
    def __init__(self, cfg: WorkspaceConfig, t: dict, dtype: torch.dtype):
        super().__init__()
        inter = cfg.inter_size // cfg.tensor_para_size
        self.w13 = _fused_linear(t, (layout.W_GATE, layout.W_UP), dtype, cfg.hidden_units)
        self.w2 = _linear(t, layout.W_DOWN, dtype, inter)

    def forward(self, gate_up):
        """gate_up: w13 of the normed input, which the layer computes (with the norm, see norm_linear)."""
        return reduce_partial(self.w2, gate_up, gated=True)   # silu(gate) * up, inside w2 where it can


class DecoderLayer(nn.Module):
    def __init__(self, cfg: WorkspaceConfig, t: dict, dtype: torch.dtype):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attention_norm = t[layout.ATTN_NORM].to(dtype)
        self.ffn_norm = t[layout.FFN_NORM].to(dtype)
        self.attention = Attention(cfg, t, dtype)
        self.feed_forward = FeedForward(cfg, t, dtype)
        self.w8a8 = self.attention.w_qkv.int8

    def norm(self, x, residual, weight):
        """(the sublayer's input, the new residual stream x + residual): one kernel for the residual
        add and the norm. W8A8: the norm emits int8 codes + per-token scales that q/k/v and gate/up
        read directly. x may be a Partial (tensor parallel): summed over the ranks here, fused with
        the add and the norm where possible."""
        if isinstance(x, Partial):
            if not self.w8a8 and residual is not None:
                return tp.all_reduce_add_rms_norm(x.x, residual, weight, self.eps)
            x = x.summed()
        if self.w8a8:
            h = x if residual is None else x.to(residual.dtype) + residual
            return ops.rms_norm_quant(h, weight, self.eps), h
        if residual is None:
            return ops.rms_norm(x, weight, self.eps), x
        return ops.add_rms_norm(x, residual, weight, self.eps)

    def norm_linear(self, x, residual, weight, linear: Linear):
        """(linear(norm(x + residual) * weight), x + residual). A plain weight takes the add, the norm
        and itself in one op (ops.add_rms_norm_linear: at batch-1 decode on the GPU the GEMV computes
        the add and the norm in its input loads, one launch less per norm), a Partial summed first
        unless the all-reduce kernel itself fuses the norm (LMDEPOT_ALLREDUCE=fused); otherwise
        self.norm, then the linear."""
        if residual is not None and linear.plain and not (isinstance(x, Partial) and tp.all_reduce_fuses_norm()):
            return linear.forward_normed(x.summed() if isinstance(x, Partial) else x, residual, weight, self.eps)
        h, residual = self.norm(x, residual, weight)
        return linear(h), residual

    def forward(self, x, residual, cos, sin):
        """x: the previous layer's last sublayer output (the embeddings for the first layer), residual:
        the stream before it (None for the first layer). Returns the same pair for the next layer."""
        qkv, residual = self.norm_linear(x, residual, self.attention_norm, self.attention.w_qkv)
        o = self.attention(qkv, cos, sin)
        gate_up, residual = self.norm_linear(o, residual, self.ffn_norm, self.feed_forward.w13)
        return self.feed_forward(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, weights: RankWeights, dtype: torch.dtype):
        super().__init__()
        cfg = self.cfg = weights.cfg
        self.dtype = dtype
        g = weights.globals
        self.tok_embeddings = g[layout.TOK_EMBEDDINGS].to(dtype)
        self.norm = g[layout.FINAL_NORM].to(dtype)
        self.output = self.tok_embeddings if cfg.tie_word_embeddings else g[layout.LM_HEAD].to(dtype)
        self.vocab_start = weights.rank * self.tok_embeddings.shape[0]
        self.layers = nn.ModuleList(DecoderLayer(cfg, t, dtype) for t in weights.layers)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # not a weight: not in model_bytes

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tp.world_size() == 1:
            return self.tok_embeddings[tokens]
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.tok_embeddings.shape[0])
        h = self.tok_embeddings[local.clamp(0, self.tok_embeddings.shape[0] - 1)] * inside[:, None]
        return tp.all_reduce(h)

    def rope(self, positions: torch.Tensor):
        cfg = self.cfg
        ctx = get_context()
        if cfg.rope_scaling_type != "dynamic" or all(s.ctx_len <= cfg.max_position_embeddings for s in ctx.seqs):
            return ops.rope_cos_sin(self.inv_freq, positions, self.dtype)
        # Dynamic NTK: a sequence past max_position_embeddings gets frequencies stretched for its current
        # length; new tokens use them, cached keys keep the ones they were rotated with (as in HF).
        parts = []
        for s in ctx.seqs:
            inv = self.inv_freq if s.ctx_len <= cfg.max_position_embeddings else dynamic_ntk_inv_freq(cfg, s.ctx_len)
            parts.append(ops.rope_cos_sin(inv, positions[s.q_start:s.q_start + s.q_len], self.dtype))
        return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states (before the final norm)."""
        h, residual = self.hidden_states(tokens, positions)
        return h if residual is None else h.to(residual.dtype) + residual

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor):
        """(the last layer's output, the residual stream before it): their sum is forward()'s output,
        which logits(*pair) computes inside the final norm."""
        h = self.embed(tokens)
        cos, sin = self.rope(positions)
        if self.cfg.use_logn_attn:
            get_context().logn = logn_factors(positions, self.cfg.max_position_embeddings)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin)
        if isinstance(h, Partial):   # the last layer's output: no norm follows inside the model
            h = h.summed()
        return h, residual

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm (of hidden + residual where given: hidden_states()'s pair, added in the norm's op,
        which at batch-1 decode the lm_head GEMV computes in its loads) + vocab-parallel lm_head,
        gathered: (n, vocab_size) float32."""
        if residual is None:
            local = ops.linear(ops.rms_norm(hidden, self.norm, self.cfg.norm_eps), self.output, None)
        else:
            local, _ = ops.add_rms_norm_linear(hidden, residual, self.norm, self.cfg.norm_eps, self.output)
        full = tp.all_gather_last(local)
        return full[:, :self.cfg.vocab_size].float()
