"""Per-step attention metadata, set by the model runner and read by the attention layers.

Keeping it out of forward() signatures lets the model stay a plain nn.Module whose forward takes
only tokens and positions, whatever the batch looks like.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SeqSlice:
    q_start: int      # first row of this sequence in the flat token batch
    q_len: int        # new tokens computed this step
    ctx_len: int      # tokens in KV after this step (cached + new)
    block_table: torch.Tensor   # int64 block ids covering ctx_len


@dataclass
class Context:
    slot_mapping: torch.Tensor = None     # (T,) cache slot of each new token
    seqs: list[SeqSlice] = field(default_factory=list)
    block_size: int = 64
    sliding_window: int = 0   # 0: full attention
    # The same batch as device tensors, built once per step, for kernels (and CUDA graphs, whose
    # captured kernels read these buffers in place): no per-op host-to-device copies.
    block_tables: torch.Tensor = None     # (S, max_blocks) int32, padded with 0
    context_lens: torch.Tensor = None     # (S,) int32: ctx_len of each sequence
    q_start_loc: torch.Tensor = None      # (S + 1,) int32: cumulative q_len
    max_q_len: int = 0
    max_ctx_len: int = 0
    # Mixed steps: how many sequences at the front of the batch decode one token each (the scheduler
    # puts running sequences first), so attention can give those rows the decode kernel.
    leading_decodes: int = 0
    tail_q_start_loc: torch.Tensor = None   # q_start_loc of the sequences after them, made once a step
    logn: torch.Tensor = None             # (T,) query factors of use_logn_attn, set by the model's forward

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one new token."""
        return self.max_q_len == 1


_CTX = Context()


def set_context(ctx: Context) -> None:
    global _CTX
    _CTX = ctx


def get_context() -> Context:
    return _CTX


def reset_context() -> None:
    set_context(Context())


def block_table_array(tables: list[list[int]], width: int | None = None, fill: int = 0) -> np.ndarray:
    """(len(tables), width) int32 array of the block tables, padded with `fill`. All rows in one
    masked assignment of their concatenation: no per-row numpy call (hundreds of rows a step)."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = width or max(1, int(lens.max(initial=0)))
    out = np.full((len(tables), width), fill, dtype=np.int32)
    total = int(lens.sum())
    if total:
        if lens.max() > width:
            raise ValueError(f"a block table of {int(lens.max())} blocks does not fit width {width}")
        out[np.arange(width) < lens[:, None]] = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32,
                                                            count=total)
    return out
