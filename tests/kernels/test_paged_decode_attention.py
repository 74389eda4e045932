import pytest
import torch

from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention, reference, split_plan
from lmdepot.runtime.kernels.scratch import semaphores
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


def _cache(num_blocks, page, hkv, d, dtype):
    return (torch.randn(num_blocks, page, hkv, d, device=DEVICE, dtype=dtype),
            torch.randn(num_blocks, page, hkv, d, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3), (32, 8)])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(dtype, hq, hkv, page, num_splits):
    d, lens = 64, [1, page - 1, 3 * page + 5, 70]
    max_pages = max(-(-n // page) for n in lens)
    k_cache, v_cache = _cache(64, page, hkv, d, dtype)
    # Pages scattered over the pool, as the block manager hands them out.
    tables = torch.stack([torch.randperm(64)[:max_pages] for _ in lens]).to(torch.int32).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=dtype)
    out = poisoned(q.shape, dtype)
    y = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, num_splits=num_splits, out=out)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, d ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def _assert_semaphores_zero():
    """Every launch must leave the shared split counters at zero (the next launch or graph replay
    counts from there)."""
    # the kernels key the array by their tensors' device (cuda:0 on a GPU, not "cuda")
    assert int(semaphores(torch.empty(0, device=DEVICE).device, 1).count_nonzero()) == 0


# tl.dot needs K >= 16 on the GPU (the interpreter takes 8); float32 dots run as TF32 there
PAGES = [8, 16, 32] if DEVICE == "cpu" else [16, 32]
TF32_TOL = 1e-4 if DEVICE == "cpu" else 5e-3


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (12, 2)])   # GQA 1, 4 and 6 (not a power of two)
@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_one_launch_splits_with_empty_splits(page, hq, hkv, num_splits):
    """Block tables wider than the sequences (a CUDA graph's fixed width): odd lengths leave some
    splits without pages, one length fits in the first split, one fills the table. Two calls on the
    same buffers with other lengths, like two graph replays; every output row is written each time."""
    d, width, dtype = 32, 9, torch.float32
    k_cache, v_cache = _cache(5 * width + 2, page, hkv, d, dtype)
    tables = torch.randperm(5 * width + 2)[: 5 * width].reshape(5, width).to(torch.int32).to(DEVICE)
    q = torch.randn(5, hq, d, device=DEVICE, dtype=dtype)
    for lens in ([1, 2 * page + 3, width * page, page + 1, 5 * page - 1], [3 * page, 7, 4 * page + 5, 1, 2 * page - 3]):
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        out = poisoned(q.shape, dtype)
        y = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, num_splits=num_splits, out=out)
        assert y.data_ptr() == out.data_ptr()
        torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, seq_lens, d ** -0.5),
                                   rtol=TF32_TOL, atol=TF32_TOL)
        _assert_semaphores_zero()


def test_split_plan_covers_the_table():
    """Splits x pages per split cover the table exactly once, without a split past its end."""
    for batch, hkv, width, want in [(1, 32, 64, None), (1, 8, 5, None), (5, 2, 9, 7), (40, 8, 64, None), (3, 1, 1, 4)]:
        splits, per = split_plan(batch, hkv, width, want)
        assert splits * per >= width and (splits - 1) * per < width and splits >= 1
    assert split_plan(1, 32, 64) == (8, 8)      # Llama-2-7B shape at batch 1: 9 wanted, 8 needed
    assert split_plan(33, 8, 64)[0] == 1        # 264 (sequence, kv head) programs: no split


def test_zero_length_sequence_gives_zeros():
    """A sequence with no tokens still gets its output rows written (zeros), split or not."""
    k_cache, v_cache = _cache(8, 16, 2, 32, torch.float32)
    tables = torch.tensor([[3, 5, 0], [7, 1, 2]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = torch.tensor([0, 40], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 3):
        y = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits,
                                   out=poisoned(q.shape, torch.float32))
        assert torch.equal(y[0], torch.zeros_like(y[0]))
        torch.testing.assert_close(y[1:], reference(q[1:], k_cache, v_cache, tables[1:], lens[1:], 32 ** -0.5),
                                   rtol=TF32_TOL, atol=TF32_TOL)
        _assert_semaphores_zero()


def test_non_contiguous_head_dim_stride():
    """The cache may be a view, e.g. K and V halves of one (blocks, page, 2, Hkv, D) pool."""
    dtype = DTYPES[0]
    pool = torch.randn(8, 16, 2, 2, 32, device=DEVICE, dtype=dtype)
    k_cache, v_cache = pool[:, :, 0], pool[:, :, 1]
    q = torch.randn(2, 4, 32, device=DEVICE, dtype=dtype)
    tables = torch.tensor([[3, 5], [7, 1]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 9], dtype=torch.int32, device=DEVICE)
    y = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, lens, 32 ** -0.5), rtol=2e-2, atol=2e-2)


def _check_real_size(batch, seq, hq, hkv, config=None):
    """Pages of 64 scattered over the pool, head dim 128, fp16, lengths seq - (i % 7); poisoned output."""
    page, d = 64, 128
    pages = -(-seq // page)
    k_cache, v_cache = _cache(batch * pages + 3, page, hkv, d, torch.float16)
    tables = torch.randperm(batch * pages + 3, device=DEVICE)[: batch * pages].reshape(batch, pages).to(torch.int32)
    lens = torch.full((batch,), seq, dtype=torch.int32, device=DEVICE) - torch.arange(batch, device=DEVICE,
                                                                                    dtype=torch.int32) % 7
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=torch.float16)
    out = poisoned(q.shape, torch.float16)
    y = paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out, config=config)
    torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, lens, d ** -0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("batch, seq", [(1, 4096), (16, 1000), (64, 300)])
def test_real_size_llama3_gqa(batch, seq):
    _check_real_size(batch, seq, 32, 8)


def _tol(dtype):
    # float32 tl.dot runs as TF32 on GPUs; half types round q, K, V and the output
    if dtype == torch.float32:
        return 5e-3 if DEVICE == "cuda" else 1e-4
    return 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("d", [64, 48])
def test_vector_mha_matches_reference(dtype, page, num_splits, d):
    """Hq == Hkv through the vector path: odd lengths, splits that end up empty (len 1 over 3 splits)."""
    hq = hkv = 3
    lens = [1, page - 1, page + 1, 3 * page + 5, 77]
    max_pages = max(-(-n // page) for n in lens)
    k_cache, v_cache = _cache(40, page, hkv, d, dtype)
    tables = torch.stack([torch.randperm(40)[:max_pages] for _ in lens]).to(torch.int32).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=dtype)
    ref = reference(q, k_cache, v_cache, tables, seq_lens, d ** -0.5)
    for config in ({"vector_mha": True}, {"vector_mha": True, "num_warps": 2, "num_stages": 1}):
        out = poisoned(q.shape, dtype)
        y = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, num_splits=num_splits, out=out,
                                   config=config)
        assert y is out
        torch.testing.assert_close(y, ref, rtol=_tol(dtype), atol=_tol(dtype))


class _SpyKernel:
    """Stands in for _split_kernel: records each launch's keyword arguments, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _launch(monkeypatch, hq, hkv, config=None, env_vector=False):
    import lmdepot.runtime.kernels.paged_decode_attention as pda

    spy = _SpyKernel(pda._split_kernel)
    monkeypatch.setattr(pda, "_split_kernel", spy)
    monkeypatch.setattr(pda, "VECTOR_MHA", env_vector)
    k_cache, v_cache = _cache(4, 16, hkv, 32, DTYPES[0])
    tables = torch.tensor([[2, 0]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([21], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, hq, 32, device=DEVICE, dtype=DTYPES[0])
    y = pda.paged_decode_attention(q, k_cache, v_cache, tables, lens, config=config)
    torch.testing.assert_close(y, reference(q, k_cache, v_cache, tables, lens, 32 ** -0.5), rtol=2e-2, atol=2e-2)
    (kwargs,) = spy.launches
    return kwargs


def test_default_launch_is_unchanged(monkeypatch):
    """Without config and env var: the grouped tl.dot path with 16 padded rows and Triton's launch defaults."""
    for hq, hkv in [(4, 4), (8, 2)]:
        kwargs = _launch(monkeypatch, hq, hkv)
        assert (kwargs["VECTOR"], kwargs["BLOCK_H"]) == (False, 16)
        assert "num_warps" not in kwargs and "num_stages" not in kwargs


def test_vector_selection_and_launch_config(monkeypatch):
    # LMDEPOT_ATTN_VECTOR_MHA=1 (VECTOR_MHA) takes the vector path for Hq == Hkv only
    assert _launch(monkeypatch, 4, 4, env_vector=True)["VECTOR"] is True
    assert _launch(monkeypatch, 4, 4, env_vector=True)["BLOCK_H"] == 1
    assert _launch(monkeypatch, 8, 2, env_vector=True)["VECTOR"] is False
    # config overrides the env var either way; GQA ignores vector_mha
    assert _launch(monkeypatch, 4, 4, {"vector_mha": False}, env_vector=True)["VECTOR"] is False
    assert _launch(monkeypatch, 4, 4, {"vector_mha": True})["VECTOR"] is True
    assert _launch(monkeypatch, 8, 2, {"vector_mha": True})["VECTOR"] is False
    kwargs = _launch(monkeypatch, 8, 2, {"num_warps": 8, "num_stages": 2})
    assert (kwargs["num_warps"], kwargs["num_stages"], kwargs["STAGES"]) == (8, 2, 1)
    # on the vector path num_stages is also the page loop's pipelining depth (default 3, Triton's)
    kwargs = _launch(monkeypatch, 4, 4, {"vector_mha": True, "num_stages": 2})
    assert (kwargs["num_stages"], kwargs["STAGES"]) == (2, 2)
    assert _launch(monkeypatch, 4, 4, {"vector_mha": True})["STAGES"] == 3


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_env_var_read_at_import(value, expected):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, LMDEPOT_ATTN_VECTOR_MHA=value, PYTHONPATH=str(root))
    code = "from lmdepot.runtime.kernels import paged_decode_attention as m; print(m.VECTOR_MHA)"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("config", [{}, {"vector_mha": True}, {"vector_mha": True, "num_warps": 8, "num_stages": 1},
                                    {"num_warps": 2, "num_stages": 2}])
@pytest.mark.parametrize("batch, seq", [(1, 256), (1, 4096), (64, 300)])
def test_real_size_llama2_mha(batch, seq, config):
    _check_real_size(batch, seq, 32, 32, config)


def _sm90_build(vector: bool, stages: int, split: bool) -> dict:
    """The split kernel built for sm_90 (tests/kernels/sm90.py): pages of 64 keys, head dim 128, the
    Llama-2-7B vector variant (one q head per kv head) or the grouped tl.dot one at GQA 4 (Llama-3-8B);
    `split`: with the in-launch merge epilogue (SPLIT) or the direct store of one split."""
    from lmdepot.runtime.kernels.paged_decode_attention import _split_kernel
    from tests.kernels.sm90 import build

    groups = 1 if vector else 4
    const = {"GROUPS": groups, "BLOCK_H": 1 if vector else 16, "D": 128, "BLOCK_D": 128, "PAGE": 64,
             "VECTOR": vector, "STAGES": stages if vector else 1, "SPLIT": split}
    types = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "bt_ptr": "*i32", "lens_ptr": "*i32",
             "o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*fp16", "sem_ptr": "*i32", "sm_scale": "fp32"}
    return build(_split_kernel, const, types, 4, stages)


@pytest.mark.parametrize("stages, split", [(1, True), (3, True), (3, False)])
def test_vector_path_compiles_for_sm90(stages, split):
    """The interpreter compiles nothing; build the vector path for an H100/H200: no spills, no tensor-core
    instructions, and the page loop's K/V loads pipelined through cp.async when STAGES > 1."""
    from tests.kernels.sm90 import run_build

    built = run_build(f"from tests.kernels.test_paged_decode_attention import _sm90_build as b; "
                      f"b(True, {stages}, {split})")
    assert (built["stack"], built["mma"], built["cp_async"]) == (0, False, stages > 1)


@pytest.mark.parametrize("split", [False, True])
def test_grouped_path_compiles_for_sm90(split):
    """The default (tl.dot) path at GQA 4, with and without the in-launch merge: no spills, tensor cores."""
    from tests.kernels.sm90 import run_build

    built = run_build(f"from tests.kernels.test_paged_decode_attention import _sm90_build as b; b(False, 3, {split})")
    assert (built["stack"], built["mma"]) == (0, True)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch, hq, hkv, config", [(1, 32, 32, None), (1, 32, 32, {"vector_mha": True}),
                                                    (3, 32, 8, None), (5, 24, 4, None)])   # Llama-2-7B, Llama-3 GQA, 6
def test_cuda_graph_replays_new_lengths(batch, hq, hkv, config):
    """One captured launch with a 64-page table replayed at short, mid and full lengths: each replay
    matches the reference and leaves the split counters at zero for the next one (the vector MHA
    path shares the epilogue)."""
    page, d, width = 64, 128, 64
    k_cache, v_cache = _cache(batch * width + 1, page, hkv, d, torch.float16)
    tables = torch.randperm(batch * width + 1, device=DEVICE)[: batch * width].reshape(batch, width).to(torch.int32)
    lens = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=torch.float16)
    out = torch.empty_like(q)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out, config=config)   # warm-up: compile, counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out, config=config)
    step = torch.arange(batch, device=DEVICE, dtype=torch.int32)
    for base in (256, 700, 4093, 1):
        lens.copy_((base - 3 * step).clamp(1, width * page))
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lens, d ** -0.5), rtol=2e-2, atol=2e-2)
        _assert_semaphores_zero()
