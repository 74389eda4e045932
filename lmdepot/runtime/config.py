"""Engine knobs. Defaults come from the workspace's config.ini runtime keys; explicit values win."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class EngineConfig:
    tp: int | None = None                # None: the workspace's tensor_para_size
    dtype: str = "auto"                  # auto | fp16 | bf16 | fp32 (compute and KV dtype)
    session_len: int | None = None       # None: config.ini session_len
    max_batch_size: int | None = None    # None: config.ini max_batch_size
    max_num_batched_tokens: int = 2048   # token budget of one step; long prompts are chunked to fit it
    cache_max_entry_count: float | None = None   # fraction of free memory given to KV blocks
    cache_block_seq_len: int | None = None
    num_kv_blocks: int | None = None     # overrides the memory-derived block count (tests, tiny budgets)
    cpu_memory_budget: int = 4 << 30     # bytes the CPU runtime may use for weights + KV
    enable_prefix_caching: bool = True
    quant_policy: int = 0                # KV cache: 0 float, 8 int8, 4 int4 (runtime/kv_cache.py)
    kv_scales: str = "online"            # online: per-token params; static: the workspace's scale files
    kv_group_size: int | None = None     # online channels per quantizer; None: the whole head
    kv_rotate: bool | None = None        # Hadamard rotation of the per-token quantizers; None: the scheme's
    kv_scheme: str | None = None         # online: plain | rotate | channel; None: channel for int4, plain for int8
    verify: bool = True                  # re-hash the rank's files against the manifest before loading
    device: str = "auto"                 # auto | cpu | cuda (one GPU per rank: cuda:<rank>)
    seed: int | None = None
    quiet: bool = False
    eager: bool = False                  # CUDA: no CUDA graphs for decode steps (debugging, profiling)
    async_steps: bool = True             # graph decode steps: launch step n+1 before step n's tokens reach the host

    def __post_init__(self):
        if self.device == "auto":
            self.device = os.environ.get("LMDEPOT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtype(self, weight_type: str) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device == "cpu" and weight_type in ("fp16", "int4", "int8"):
            return torch.float32  # CPU fp16 matmuls are slow and lose precision; bf16 stays bf16
        return DTYPES.get(weight_type, torch.float16)
