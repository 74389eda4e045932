"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed instead of ~10 launches a layer.

A decode step (every sequence computes one token) has the same kernels and shapes whatever its
contents, once the batch is padded to a bucket and the block tables to a fixed width. Each bucket's
graph is captured once, at engine start, reading static input buffers that every step refills:

- tokens, positions, slot_mapping (b,), block_tables (b, max_blocks) int32, context_lens (b,) int32.
- Padded rows compute token 0 at position 0 with context_len 1 and their only block the scratch
  block: the KV cache has one block more than the block manager hands out, so a padded row's KV
  write can never land in a real sequence's block.

The graph includes the final norm and lm_head: its output is the (b, vocab) logits. Captured ops
must take every per-step value from these tensors, never from python values: the runner only uses a
graph where that holds (see `DecodeGraphs.fits` and `ModelRunner._graphs_apply`), and everything
else runs eagerly as before. This holds for the float cache and for the quantized one (quant_policy
8/4 with the Triton store and decode kernels): a padded row's codes, per-token scales/zeros and, in
the `channel` scheme, its block's per-channel key params and exact first-key row all land in the
scratch block, which every per-block tensor of the cache holds.

With tensor parallelism every rank captures the same buckets in the same order at start (the NCCL
all-reduces are captured too) and decides per step from the broadcast metadata alone, so all ranks
replay the same graph.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from lmdepot.runtime.context import Context, SeqSlice, block_table_array, reset_context, set_context

# Larger decode batches run eagerly: their launches are a small part of the step, and every bucket
# costs capture time at start.
MAX_GRAPH_BATCH = 256


class GraphCaptureError(RuntimeError):
    """A bucket's warm-up or capture raised: the runner warns with this one line and decodes eagerly."""

    def __init__(self, bucket: int, exc: BaseException):
        root = exc
        while root.__context__ is not None:   # a failed capture_end hides the op that broke the capture
            root = root.__context__
        first = (str(root).strip().splitlines() or [""])[0]
        super().__init__(f"CUDA graph capture failed at batch {bucket} ({type(root).__name__}: {first})")
        self.bucket = bucket


def buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (and max_bs itself), at most MAX_GRAPH_BATCH: at most
    15 padded rows a step."""
    max_bs = min(max_bs, MAX_GRAPH_BATCH)
    out = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return out + [max_bs]


class DecodeGraphs:
    def __init__(self, model, block_size: int, max_blocks: int, max_bs: int, scratch_block: int,
                 sliding_window: int, device: torch.device, capture: bool = True):
        """capture=False runs the same padded static-buffer step eagerly instead of replaying a graph
        (the CPU tests check the padding and scratch-block logic that way)."""
        self.model, self.block_size, self.max_blocks = model, block_size, max_blocks
        self.sliding_window, self.device, self.capture = sliding_window, device, capture
        self.sizes = buckets(max_bs)
        self.scratch_slot = scratch_block * block_size
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.tokens, self.positions = torch.zeros(n, **i64), torch.zeros(n, **i64)
        self.slots = torch.full((n,), self.scratch_slot, **i64)
        self.block_tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.q_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0
        self.used: set[int] = set()   # buckets replayed so far (tests)

    # --- which steps fit ---------------------------------------------------------------------------
    def fits(self, meta: dict, cfg) -> bool:
        """A decode step this capture can run: every decision here depends on the metadata only, so
        every tensor-parallel rank takes the same branch."""
        seqs = meta["seqs"]
        if not seqs or len(seqs) > self.sizes[-1] or len(meta["tokens"]) != len(seqs):
            return False
        if len(meta["logit_rows"]) != len(seqs):   # a one-token prefill chunk predicts nothing
            return False
        if any(len(table) > self.max_blocks for _, _, table in seqs):
            return False
        longest = max(c for _, c, _ in seqs)
        # The decode kernel has no window: the reference (a python loop) takes windows past their width.
        if self.sliding_window and longest > self.sliding_window:
            return False
        # Dynamic NTK rope switches frequencies per sequence in python once past max_position_embeddings.
        if cfg.rope_scaling_type == "dynamic" and longest > cfg.max_position_embeddings:
            return False
        return True

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    # --- capture -------------------------------------------------------------------------------------
    def _context(self, b: int, lens: list[int] | None = None) -> Context:
        """The Context the captured ops read: views of the static buffers. `seqs` mirrors them for the
        python-level checks of the ops (and, without capture, for the reference attention)."""
        longest = self.max_blocks * self.block_size
        if self.sliding_window:   # steps past the window run eagerly: the graph holds the no-window kernel
            longest = min(longest, self.sliding_window)
        if lens is not None:
            longest = max(lens)
        lens = lens or [1] * b
        seqs = [SeqSlice(i, 1, c, self.block_tables[i, :-(-c // self.block_size)].long()) for i, c in enumerate(lens)]
        return Context(self.slots[:b], seqs, self.block_size, self.sliding_window, block_tables=self.block_tables[:b],
                       context_lens=self.context_lens[:b], q_start_loc=self.q_start_loc[:b + 1], max_q_len=1,
                       max_ctx_len=longest)

    def _forward(self, b: int) -> torch.Tensor:
        # the pair: the final residual add happens inside the final norm (fused with lm_head at batch 1)
        return self.model.logits(*self.model.hidden_states(self.tokens[:b], self.positions[:b]))

    @torch.inference_mode()
    def capture_all(self, quiet: bool = True) -> None:
        """Capture every bucket; on any error drop what was captured and raise GraphCaptureError."""
        if not self.capture:
            return
        t0 = time.perf_counter()
        # Largest first: the shared pool is sized by the biggest bucket and the smaller ones reuse it.
        for b in reversed(self.sizes):
            try:
                self._capture_one(b)
            except Exception as exc:
                self.close()
                raise GraphCaptureError(b, exc) from exc
        torch.cuda.synchronize(self.device)
        if not quiet:
            print(f"[lmdepot] captured {len(self.sizes)} decode CUDA graphs (batch {self.sizes[0]}..{self.sizes[-1]})"
                  f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def _capture_one(self, b: int) -> None:
        set_context(self._context(b))
        try:
            self._forward(b)   # warm-up outside the graph: Triton compiles, cuBLAS picks, NCCL inits
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (NCCL's watchdog, a server's) do not void the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[b] = self._forward(b)
        finally:
            reset_context()
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[b] = graph

    # --- one step ------------------------------------------------------------------------------------
    def run(self, meta: dict, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The step's (n, vocab) float32 logits on the device, rows in batch order; no host sync.
        `tokens`: the (n,) input ids as a device tensor (the previous step's sampled tokens, which the
        host has not seen yet); they replace meta["tokens"] by a device-to-device copy."""
        n = len(meta["seqs"])
        b = self.bucket(n)
        pad = b - n
        lens = [c for _, c, _ in meta["seqs"]] + [1] * pad
        # through numpy: a third of torch.tensor's time on python int lists
        rows = torch.from_numpy(np.array([meta["tokens"] + [0] * pad, meta["positions"] + [0] * pad,
                                          meta["slots"] + [self.scratch_slot] * pad, lens], dtype=np.int64))
        scratch_block = self.scratch_slot // self.block_size
        # filled with the scratch block too: no row's table points at a real block it does not own
        tables = torch.from_numpy(block_table_array([t for _, _, t in meta["seqs"]] + [[scratch_block]] * pad,
                                                    self.max_blocks, fill=scratch_block))
        if self.device.type == "cuda":   # pinned: the copies are queued behind the previous step, no sync
            rows, tables = rows.pin_memory(), tables.pin_memory()
        self.tokens[:b].copy_(rows[0], non_blocking=True)
        self.positions[:b].copy_(rows[1], non_blocking=True)
        self.slots[:b].copy_(rows[2], non_blocking=True)
        self.context_lens[:b].copy_(rows[3], non_blocking=True)
        self.block_tables[:b].copy_(tables, non_blocking=True)
        if tokens is not None:   # queued after the copy above, which wrote placeholders for these rows
            self.tokens[:n].copy_(tokens, non_blocking=True)
        self.replays += 1
        self.used.add(b)
        if self.capture:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        set_context(self._context(b, lens))
        try:
            return self._forward(b)[:n]
        finally:
            reset_context()

    def close(self) -> None:
        """Drop the graphs, their outputs and the pool so that the caching allocator can free them."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
