"""Tensor-parallel splitting of canonical layers into per-rank workspace tensors, and its inverse.

Column-parallel (split by output columns): w_qkv by heads, keeping each rank's q, k and v together;
w1 and w3. Row-parallel (split by input rows): wo and w2; their biases stay whole on every rank and
are added once, after the all-reduce. Embeddings and lm_head are split by vocab rows, padded with
zero rows up to a multiple of tp.
"""

from __future__ import annotations

from math import gcd
from typing import Callable

import torch

from lmdepot.convert.arch import LayerTensors
from lmdepot.convert.linear import TORCH_DTYPES, Linear
from lmdepot.errors import ConvertError
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig


def valid_tp_sizes(cfg: WorkspaceConfig, limit: int = 16) -> list[int]:
    common = gcd(gcd(cfg.head_num, cfg.kv_head_num), cfg.inter_size)
    return [n for n in range(1, limit + 1) if common % n == 0]


def check_tp(cfg: WorkspaceConfig, tp: int) -> None:
    if cfg.head_num % tp or cfg.kv_head_num % tp or cfg.inter_size % tp:
        hint = " or ".join(map(str, valid_tp_sizes(cfg)))
        raise ConvertError(f"--tp {tp} does not divide the model's heads: head_num={cfg.head_num},"
                           f" kv_head_num={cfg.kv_head_num}, inter_size={cfg.inter_size}; use --tp {hint}")


def check_int4_tp(cfg: WorkspaceConfig, group_size: int) -> None:
    """Row-parallel int4 slices must start on group boundaries of the source quantization."""
    tp = cfg.tensor_para_size
    for name, rows in (("wo", cfg.q_size // tp), ("w2", cfg.inter_size // tp)):
        if tp > 1 and rows % group_size:
            raise ConvertError(f"--tp {tp} splits {name} into {rows} input rows per rank, not a multiple of"
                               f" the checkpoint's group size {group_size}")


def split_layer(layer: LayerTensors, cfg: WorkspaceConfig, rank: int, dtype: str,
                quantize: Callable[[Linear], Linear] | None = None) -> dict[str, torch.Tensor]:
    """`quantize`, if given, turns each rank's float slice of a linear into int4, so quantization
    groups never straddle two ranks (see `lmdepot.convert.quant_groups`)."""
    q_ = quantize or (lambda lin: lin)
    tp, d = cfg.tensor_para_size, cfg.size_per_head
    hq, hkv = cfg.head_num // tp, cfg.kv_head_num // tp
    inter = cfg.inter_size // tp
    q, k, v = layer.qkv
    qkv = Linear.cat_columns([q.columns(rank * hq * d, (rank + 1) * hq * d),
                              k.columns(rank * hkv * d, (rank + 1) * hkv * d),
                              v.columns(rank * hkv * d, (rank + 1) * hkv * d)])
    out = {}
    out |= q_(qkv).tensors(layout.W_QKV, dtype)
    out |= q_(layer.o.rows(rank * hq * d, (rank + 1) * hq * d)).tensors(layout.W_O, dtype)
    out |= q_(layer.gate.columns(rank * inter, (rank + 1) * inter)).tensors(layout.W_GATE, dtype)
    out |= q_(layer.up.columns(rank * inter, (rank + 1) * inter)).tensors(layout.W_UP, dtype)
    out |= q_(layer.down.rows(rank * inter, (rank + 1) * inter)).tensors(layout.W_DOWN, dtype)
    torch_dtype = TORCH_DTYPES[dtype]
    out[layout.ATTN_NORM] = layer.attn_norm.to(torch_dtype)
    out[layout.FFN_NORM] = layer.ffn_norm.to(torch_dtype)
    return out


def vocab_rows(cfg: WorkspaceConfig, rank: int) -> tuple[int, int]:
    per_rank = cfg.padded_vocab() // cfg.tensor_para_size
    return rank * per_rank, (rank + 1) * per_rank


def split_vocab(table: torch.Tensor, cfg: WorkspaceConfig, rank: int) -> torch.Tensor:
    pad = cfg.padded_vocab() - table.shape[0]
    if pad:
        table = torch.cat([table, table.new_zeros(pad, table.shape[1])])
    start, end = vocab_rows(cfg, rank)
    return table[start:end]


def merge_layer(ranks: list[dict[str, torch.Tensor]], cfg: WorkspaceConfig) -> dict[str, torch.Tensor]:
    """Inverse of split_layer for plain weights: HF-oriented (out, in) q/k/v/o/gate/up/down (+ biases)."""
    tp, d = cfg.tensor_para_size, cfg.size_per_head
    hq, hkv = cfg.head_num // tp, cfg.kv_head_num // tp
    qs, ks, vs, qb, kb, vb = [], [], [], [], [], []
    for t in ranks:
        w = t[f"{layout.W_QKV}.weight"]
        qs.append(w[:, :hq * d]), ks.append(w[:, hq * d:(hq + hkv) * d]), vs.append(w[:, (hq + hkv) * d:])
        if f"{layout.W_QKV}.bias" in t:
            b = t[f"{layout.W_QKV}.bias"]
            qb.append(b[:hq * d]), kb.append(b[hq * d:(hq + hkv) * d]), vb.append(b[(hq + hkv) * d:])
    merged = {"q": torch.cat(qs, 1).t(), "k": torch.cat(ks, 1).t(), "v": torch.cat(vs, 1).t(),
              "o": torch.cat([t[f"{layout.W_O}.weight"] for t in ranks], 0).t(),
              "gate": torch.cat([t[f"{layout.W_GATE}.weight"] for t in ranks], 1).t(),
              "up": torch.cat([t[f"{layout.W_UP}.weight"] for t in ranks], 1).t(),
              "down": torch.cat([t[f"{layout.W_DOWN}.weight"] for t in ranks], 0).t(),
              "attn_norm": ranks[0][layout.ATTN_NORM], "ffn_norm": ranks[0][layout.FFN_NORM]}
    if qb:
        merged |= {"q_bias": torch.cat(qb), "k_bias": torch.cat(kb), "v_bias": torch.cat(vb)}
    if f"{layout.W_O}.bias" in ranks[0]:
        merged["o_bias"] = ranks[0][f"{layout.W_O}.bias"]
    return merged
