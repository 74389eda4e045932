"""Model runner: owns one rank's model and KV cache, turns step metadata into logits.

Step metadata is a plain dict of python lists so that rank 0 can broadcast it to the other ranks
as is; every rank executes the identical forward on its own shard.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import torch

from lmdepot.runtime import ops, tp
from lmdepot.runtime.config import EngineConfig
from lmdepot.runtime.context import Context, SeqSlice, block_table_array, reset_context, set_context
from lmdepot.runtime.cuda_graph import DecodeGraphs, GraphCaptureError
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


def _tensor(values: list[int], dtype, device: torch.device) -> torch.Tensor:
    """A python int list on the device, through numpy (a third of torch.tensor's time on lists)."""
    return torch.from_numpy(np.array(values, dtype=dtype)).to(device)


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
        if self.device.type == "cuda":   # the loaded copies of weights the model transposed or repacked: give
            torch.cuda.empty_cache()     # them back, so that the KV cache sizing below sees them free
        self.block_size = ecfg.cache_block_seq_len or cfg.cache_block_seq_len
        self.graphs: DecodeGraphs | None = None
        self.use_graphs = self._graphs_apply(ecfg)
        # With graphs the cache holds one scratch block past the block manager's num_blocks: padded
        # batch rows write their KV there (cuda_graph.py).
        self.num_blocks = self._size_cache(ecfg)
        _, hkv = cfg.heads_of_rank()
        for i, layer in enumerate(self.model.layers):
            cache = allocate(self.kv_spec, self.num_blocks + int(self.use_graphs), self.block_size, hkv,
                             cfg.size_per_head, static[i] if static else None, sym, device=self.device)
            if self.kv_spec.bits:
                layer.attention.kv_quant = cache
            else:
                layer.attention.k_cache, layer.attention.v_cache = cache
        if self.use_graphs:
            session_len = ecfg.session_len or cfg.session_len
            max_bs = ecfg.max_batch_size or cfg.max_batch_size
            self.graphs = DecodeGraphs(self.model, self.block_size, -(-session_len // self.block_size), max_bs,
                                       self.num_blocks, cfg.sliding_window, self.device,
                                       capture=self.device.type == "cuda")
            self._capture_graphs(quiet=ecfg.quiet or tp.rank() != 0)

    def _capture_graphs(self, quiet: bool) -> None:
        """A capture that raises (an op not graph-safe after all, a driver limit) costs speed, not the
        engine: one warning line, then every step runs eagerly."""
        error = None
        try:
            self.graphs.capture_all(quiet=quiet)
        except GraphCaptureError as exc:
            error = exc
        failed = error is not None
        if tp.world_size() > 1:   # all ranks replay the same graphs or none (a failure is usually on all)
            t = torch.tensor([int(failed)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            failed = bool(t)
        if failed:
            if error is not None:
                rank = f" (rank {tp.rank()})" if tp.world_size() > 1 else ""
                print(f"[lmdepot] warning{rank}: {error}; decode steps run eagerly", file=sys.stderr)
            self.close_graphs()

    def _graphs_apply(self, ecfg: EngineConfig) -> bool:
        """CUDA graphs for decode steps, unless --eager or an op on the decode path is not graph-safe.
        LMDEPOT_GRAPHS_ON_CPU=1 runs the padded static-buffer path on the CPU, uncaptured (tests)."""
        if ecfg.eager:
            return False
        if self.device.type != "cuda" and os.environ.get("LMDEPOT_GRAPHS_ON_CPU") != "1":
            return False
        if self.device.type != "cuda":
            return True
        # The Triton decode kernels (graph-safe) need head_dim and pages of at least 16; smaller ones, or
        # other attention ops registered (tests swap in the reference), loop over the sequences in python.
        from lmdepot.runtime.ops import triton_ops

        if self.cfg.size_per_head < 16 or self.block_size < 16:
            return False
        if not self.kv_spec.bits:
            return ops.get("paged_attention") in (triton_ops.paged_attention, triton_ops.paged_attention_kernel)
        # Quantized cache: its Triton store and decode kernels read only the Context's tensors; the torch
        # references they fall back to (static scales, groups smaller than a head, a head_dim that is not
        # a power of two) sync on the host (the channel store) or loop over ctx.seqs (attention).
        return ops.get("store_kv_quant") is triton_ops.store_kv_quant \
            and ops.get("paged_attention_quant") is triton_ops.paged_attention_quant \
            and triton_ops._kv_kernels_fit(self.kv_spec, self.cfg.size_per_head)

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
            n = int(max(free, 0) * ratio) // block - int(self.use_graphs)   # the scratch block comes out of it
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
        """(len(logit_rows), vocab) float32 logits on this rank's device; every rank runs it."""
        if meta.get("device_tokens"):   # ranks 1..N-1 of a step launched ahead: the ids come from rank 0
            ids = torch.empty(len(meta["seqs"]), dtype=torch.int64, device=self.device)
            return self.graphs.run(meta, tp.broadcast_tensor(ids))
        if self.graphs is not None and self.graphs.fits(meta, self.cfg):
            return self.graphs.run(meta)   # decode: every row is a logit row, in batch order
        dev = self.device
        tokens, positions = _tensor(meta["tokens"], np.int64, dev), _tensor(meta["positions"], np.int64, dev)
        set_context(self.context(meta))
        try:
            # (last output, residual): their sum is computed inside the final norm, for the logit rows only
            hidden = self.model.hidden_states(tokens, positions)
            rows = meta["logit_rows"]
            if len(rows) != len(meta["tokens"]):   # else every row is one (a decode step): no gather
                idx = _tensor(rows, np.int64, dev)
                hidden = tuple(t if t is None else t[idx] for t in hidden)
            return self.model.logits(*hidden)
        finally:
            reset_context()

    def context(self, meta: dict) -> Context:
        """One host-to-device copy per tensor, whatever the batch size; each SeqSlice's block table is
        a view of the step's table (all views cut by one split of the flattened rows: row i is the
        part of length len(table_i) of the sizes [len(table_0), pad_0, len(table_1), pad_1, ...])."""
        dev = self.device
        specs = meta["seqs"]
        tables = block_table_array([table for _, _, table in specs])
        tables_dev = torch.from_numpy(tables).to(dev)
        width = tables.shape[1]
        sizes = []
        for _, _, table in specs:
            sizes += (len(table), width - len(table))
        views = tables_dev.view(-1).split(sizes)[::2] if specs else ()
        q_lens = [q for q, _, _ in specs]
        lens = [ctx_len for _, ctx_len, _ in specs]
        starts = list(itertools.accumulate(q_lens, initial=0))
        seqs = list(map(SeqSlice, starts, q_lens, lens, views))
        return Context(_tensor(meta["slots"], np.int64, dev), seqs, self.block_size,
                       self.cfg.sliding_window, block_tables=tables_dev,
                       context_lens=_tensor(lens, np.int32, dev), q_start_loc=_tensor(starts, np.int32, dev),
                       max_q_len=max(q_lens, default=0), max_ctx_len=max(lens, default=0),
                       leading_decodes=next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens)))

    def can_run_ahead(self) -> bool:
        """Whether decode steps can take their input ids from a device tensor (`run_decode`): the
        static-buffer decode path (with several ranks, rank 0 broadcasts the ids on the device)."""
        return self.graphs is not None

    def run_decode(self, meta: dict, tokens: torch.Tensor) -> torch.Tensor:
        """A decode step whose input ids are `tokens` (device, (n,)), not meta["tokens"]: the caller
        checked can_run_ahead() and graphs.fits(meta). Logits stay on the device; nothing syncs."""
        if tp.world_size() > 1:
            tp.send_step({**meta, "device_tokens": True})
            tokens = tp.broadcast_tensor(tokens.to(torch.int64).contiguous())
        return self.graphs.run(meta, tokens)

    def run(self, meta: dict, host: bool = True) -> torch.Tensor:
        """Rank 0: broadcast the step, run it. host=False leaves the logits on the device (the engine
        samples there); host=True copies them to the CPU (perplexity, tests)."""
        if tp.world_size() > 1:
            tp.send_step(meta)
        logits = self.execute(meta)
        return logits.cpu() if host else logits

    def close(self) -> None:
        if tp.world_size() > 1 and tp.rank() == 0:
            tp.send_step(None)
        self.close_graphs()

    def close_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
