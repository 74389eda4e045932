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
from lmdepot.runtime.errors import CacheFullError
from lmdepot.runtime.kv_cache import allocate, kv_block_bytes, load_static_scales, make_spec
from lmdepot.runtime.loader import load_rank
from lmdepot.runtime.model import LlamaModel


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
        self.kv_spec = make_spec(ecfg.quant_policy, self.dtype, cfg.size_per_head, ecfg.kv_scales,
                                 ecfg.kv_group_size, ecfg.kv_rotate, ecfg.kv_scheme)
        static, sym = None, False
        if self.kv_spec.static:  # before the model is built: a missing file must fail fast
            static, sym = load_static_scales(self.workspace, cfg, rank, ecfg.quant_policy)
        weights.to(self.device)
        self.model = LlamaModel(weights, self.dtype).to(self.device)
        del weights
        self.block_size = ecfg.cache_block_seq_len or cfg.cache_block_seq_len
        self.num_blocks = self._size_cache(ecfg)
        _, hkv = cfg.heads_of_rank()
        for i, layer in enumerate(self.model.layers):
            cache = allocate(self.kv_spec, self.num_blocks, self.block_size, hkv, cfg.size_per_head,
                             static[i] if static else None, sym, device=self.device)
            if self.kv_spec.bits:
                layer.attention.kv_quant = cache
            else:
                layer.attention.k_cache, layer.attention.v_cache = cache

    def _size_cache(self, ecfg: EngineConfig) -> int:
        block = self.block_bytes = kv_block_bytes(self.cfg, self.block_size, self.kv_spec)
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
            kind = "float" if not self.kv_spec.bits else f"int{self.kv_spec.bits}"
            print(f"[lmdepot] weights {weights / 2**20:.1f} MiB/rank; {kind} KV cache: {n} blocks x {self.block_size}"
                  f" tokens = {n * self.block_size} tokens max ({n * block / 2**20:.1f} MiB/rank)", file=sys.stderr)
        return n

    def execute(self, meta: dict) -> torch.Tensor:
        dev = self.device
        tokens = torch.tensor(meta["tokens"], dtype=torch.int64, device=dev)
        positions = torch.tensor(meta["positions"], dtype=torch.int64, device=dev)
        set_context(self.context(meta))
        try:
            hidden = self.model(tokens, positions)
            # Sampling runs on the host for now: one device-to-host copy of the logits per step.
            return self.model.logits(hidden[meta["logit_rows"]]).cpu()
        finally:
            reset_context()

    def context(self, meta: dict) -> Context:
        dev = self.device
        seqs, starts = [], [0]
        width = max((len(table) for _, _, table in meta["seqs"]), default=0)
        tables = torch.zeros(len(meta["seqs"]), max(width, 1), dtype=torch.int32)
        for i, (q_len, ctx_len, table) in enumerate(meta["seqs"]):
            tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
            seqs.append(SeqSlice(starts[-1], q_len, ctx_len, tables[i, :len(table)].to(dev, torch.int64)))
            starts.append(starts[-1] + q_len)
        lens = [ctx_len for _, ctx_len, _ in meta["seqs"]]
        return Context(torch.tensor(meta["slots"], dtype=torch.int64, device=dev), seqs, self.block_size,
                       self.cfg.sliding_window, block_tables=tables.to(dev),
                       context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                       q_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
                       max_q_len=max((q for q, _, _ in meta["seqs"]), default=0), max_ctx_len=max(lens, default=0))

    def run(self, meta: dict) -> torch.Tensor:
        if tp.world_size() > 1:
            tp.broadcast_object(meta)
        return self.execute(meta)

    def close(self) -> None:
        if tp.world_size() > 1 and tp.rank() == 0:
            tp.broadcast_object(None)
