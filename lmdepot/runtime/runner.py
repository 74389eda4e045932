"""Model runner: owns one rank's model and KV cache, turns step metadata into logits.

Step metadata is a plain dict of python lists so that rank 0 can broadcast it to the other ranks
as is; every rank executes the identical forward on its own shard.
"""

from __future__ import annotations

import sys

import torch

from lmdepot.runtime import tp
from lmdepot.runtime.config import EngineConfig
from lmdepot.runtime.context import Context, SeqSlice, reset_context, set_context
from lmdepot.runtime.errors import CacheFullError, RuntimeLoadError
from lmdepot.runtime.loader import load_rank
from lmdepot.runtime.model import LlamaModel


def kv_block_bytes(cfg, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block on one rank: K and V, every layer, this rank's kv heads."""
    _, hkv = cfg.heads_of_rank()
    return 2 * cfg.num_layer * block_size * hkv * cfg.size_per_head * torch.empty((), dtype=dtype).element_size()


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for obj in [model, *model.modules()]:
        for t in vars(obj).values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class ModelRunner:
    def __init__(self, source, ecfg: EngineConfig, rank: int = 0):
        if ecfg.quant_policy not in (0,):
            raise RuntimeLoadError(f"--quant-policy {ecfg.quant_policy} (int{ecfg.quant_policy} KV cache) is not yet"
                                   " supported; use 0")
        # One GPU per rank: "cuda" means cuda:<rank>.
        self.device = torch.device(f"cuda:{rank}" if ecfg.device == "cuda" else ecfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            from lmdepot.runtime.ops import triton_ops

            triton_ops.install()
        weights = load_rank(source, rank, tp=ecfg.tp, verify=ecfg.verify)
        self.cfg = cfg = weights.cfg
        self.workspace = weights.workspace
        self.dtype = ecfg.torch_dtype(cfg.weight_type)
        weights.to(self.device)
        self.model = LlamaModel(weights, self.dtype).to(self.device)
        del weights
        self.block_size = ecfg.cache_block_seq_len or cfg.cache_block_seq_len
        self.num_blocks = self._size_cache(ecfg)
        _, hkv = cfg.heads_of_rank()
        shape = (self.num_blocks, self.block_size, hkv, cfg.size_per_head)
        for layer in self.model.layers:
            layer.attention.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)  # CPU pages commit
            layer.attention.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)  # on first write

    def _size_cache(self, ecfg: EngineConfig) -> int:
        block = kv_block_bytes(self.cfg, self.block_size, self.dtype)
        weights = self.weight_bytes = model_bytes(self.model)
        if ecfg.num_kv_blocks is not None:
            n = ecfg.num_kv_blocks
        else:
            ratio = ecfg.cache_max_entry_count if ecfg.cache_max_entry_count is not None \
                else self.cfg.cache_max_entry_count
            if ecfg.device.startswith("cuda"):
                free = torch.cuda.mem_get_info()[0]
            else:
                free = ecfg.cpu_memory_budget - weights
            n = int(max(free, 0) * ratio) // block
        if tp.world_size() > 1:  # every rank must agree on the block ids
            t = torch.tensor([n], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            n = int(t)
        if n < 1:
            raise CacheFullError(f"no room for a single KV block ({block} bytes) after {weights} bytes of weights;"
                                 " raise --cache-max-entry-count or the memory budget")
        if tp.rank() == 0 and not ecfg.quiet:
            print(f"[lmdepot] weights {weights / 2**20:.1f} MiB/rank; KV cache: {n} blocks x {self.block_size}"
                  f" tokens = {n * self.block_size} tokens max ({n * block / 2**20:.1f} MiB/rank)", file=sys.stderr)
        return n

    def execute(self, meta: dict) -> torch.Tensor:
        dev = self.device
        tokens = torch.tensor(meta["tokens"], dtype=torch.int64, device=dev)
        positions = torch.tensor(meta["positions"], dtype=torch.int64, device=dev)
        seqs, start = [], 0
        for q_len, ctx_len, table in meta["seqs"]:
            seqs.append(SeqSlice(start, q_len, ctx_len, torch.tensor(table, dtype=torch.int64, device=dev)))
            start += q_len
        set_context(Context(torch.tensor(meta["slots"], dtype=torch.int64, device=dev), seqs, self.block_size,
                            self.cfg.sliding_window))
        try:
            hidden = self.model(tokens, positions)
            # Sampling runs on the host for now: one device-to-host copy of the logits per step.
            return self.model.logits(hidden[meta["logit_rows"]]).cpu()
        finally:
            reset_context()

    def run(self, meta: dict) -> torch.Tensor:
        if tp.world_size() > 1:
            tp.broadcast_object(meta)
        return self.execute(meta)

    def close(self) -> None:
        if tp.world_size() > 1 and tp.rank() == 0:
            tp.broadcast_object(None)
