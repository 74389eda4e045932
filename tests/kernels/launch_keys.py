"""How many builds of each Triton kernel a series of launches needs, on a machine without a GPU.

Triton builds a kernel once per *specialization* of its launch: each integer argument equal to 1 or
divisible by 16, and each pointer 16-byte aligned or not, is a different build (seconds each for the
attention kernels). Arguments that change from step to step (a block table's width, a slice's offset,
a split plan) therefore cost compiles in the middle of serving. `run_scenario` runs the kernels'
python launchers in a fresh interpreter without TRITON_INTERPRET (CPU tensors) with
JITFunction.run replaced by a recorder of the specialization Triton would key its build on; nothing
is launched."""

from __future__ import annotations

import json
from types import SimpleNamespace


def run_scenario(name: str) -> dict[str, int]:
    """{kernel: number of distinct builds} over scenario `name` (a function of this module)."""
    from tests.kernels.sm90 import run_uninterpreted

    return run_uninterpreted(f"from tests.kernels.launch_keys import _record; _record({name!r})")


def _record(name: str) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[str, set] = {}

    def run(self, *args, grid, warmup, **kwargs):
        _, specialization, options = create_function_from_signature(self.signature, self.params, backend)(
            *args, **kwargs)
        kernel = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        keys.setdefault(kernel, set()).add(repr((specialization, sorted(options.items()))))

    JITFunction.run = run
    globals()[name]()
    print(json.dumps({k: len(v) for k, v in sorted(keys.items())}))


def _mixed_steps(decode, prefill, dtype_cache, store=None):
    """Mixed prefill + decode steps as the engine's split_mixed launches them: 16-40 leading decodes,
    one to three prefill chunks, block tables 3-40 pages wide (what a serving run's steps look like)."""
    import torch

    from lmdepot.runtime.ops.triton_ops import split_mixed

    Hq, Hkv, D, page = 8, 2, 64, 16
    for n_dec, n_pre, width in ((16, 1, 3), (17, 2, 5), (18, 1, 12), (19, 3, 16), (21, 2, 17), (24, 1, 32),
                                (31, 2, 33), (40, 3, 40), (33, 1, 1)):
        q_lens = [1] * n_dec + [7 + 5 * i for i in range(n_pre)]
        S = len(q_lens)
        lens = torch.tensor([min(width * page, 3 + 9 * i) for i in range(S)], dtype=torch.int32)
        ctx = SimpleNamespace(
            leading_decodes=n_dec, tail_q_start_loc=None,
            q_start_loc=torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32),
            block_tables=torch.zeros(S, width, dtype=torch.int32), context_lens=lens, max_q_len=max(q_lens))
        q = torch.zeros(sum(q_lens), Hq, D, dtype=torch.float16)
        if store is not None:
            store(torch.zeros(sum(q_lens), Hkv, D, dtype=torch.float16), ctx, dtype_cache)
        split_mixed(q, ctx, lambda q, bt, lens, out: decode(q, bt, lens, out, dtype_cache),
                    lambda q, bt, qsl, lens, out: prefill(q, bt, qsl, lens, out, ctx.max_q_len, dtype_cache))


def mixed_fp16() -> None:
    import torch

    from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention
    from lmdepot.runtime.kernels.prefill_attention import prefill_attention

    kv = [torch.zeros(64, 16, 2, 64, dtype=torch.float16) for _ in range(2)]
    _mixed_steps(lambda q, bt, lens, out, c: paged_decode_attention(q, *c, bt, lens, out=out),
                 lambda q, bt, qsl, lens, out, m, c: prefill_attention(q, *c, bt, qsl, lens, m, out=out), kv)


def mixed_quant() -> None:
    import torch

    from lmdepot.runtime.kernels.kv_store_channel import store_keys_channel
    from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant
    from lmdepot.runtime.kernels.prefill_attention_quant import prefill_attention_quant
    from lmdepot.runtime.kv_cache import allocate, make_spec

    for bits, scheme in ((8, "plain"), (4, "channel")):
        cache = allocate(make_spec(bits, torch.float16, 64, scheme=scheme), 64, 16, 2, 64, device="cpu")
        _mixed_steps(lambda q, bt, lens, out, c: paged_decode_attention_quant(q, c, bt, lens, out=out),
                     lambda q, bt, qsl, lens, out, m, c: prefill_attention_quant(q, c, bt, qsl, lens, m, out=out),
                     cache, store=None if scheme != "channel" else lambda k, ctx, c: store_keys_channel(
                         k, c, ctx.block_tables, ctx.context_lens, ctx.q_start_loc, ctx.max_q_len))


def int4_rows() -> None:
    """An int4 linear (K 256, N 512, group 128) at every row count a prefill chunk or a batch of
    decodes gives it below the dequantize path (1-127 rows: the GEMV up to 4, then the GEMM)."""
    import torch

    from lmdepot.runtime.kernels import w4a16_gemv
    from lmdepot.runtime.ops.triton_ops import linear_int4_packed

    K, N = 256, 512
    packed = w4a16_gemv.repack(torch.zeros(K // 8, N, dtype=torch.int32), torch.ones(K // 128, N, dtype=torch.float16),
                               torch.zeros(K // 128, N, dtype=torch.float16))
    for M in range(1, 128):
        linear_int4_packed(torch.zeros(M, K, dtype=torch.float16), packed)


def int8_rows() -> None:
    """A W8A8 linear (K 256, N 512) at 1-300 rows."""
    import torch

    from lmdepot.runtime.kernels.w8a8 import w8a8_linear

    K, N = 256, 512
    w, ws = torch.zeros(N, K, dtype=torch.int8), torch.ones(N, dtype=torch.float32)
    for M in range(1, 300):
        w8a8_linear(torch.zeros(M, K, dtype=torch.int8), torch.ones(M, 1, dtype=torch.float32), w, ws, None,
                    out_dtype=torch.float16)
