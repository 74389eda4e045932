"""Per-step launch arguments must not cost Triton builds in the middle of serving (launch_keys.py)."""

from tests.kernels.launch_keys import run_scenario


def test_mixed_steps_build_each_attention_kernel_once():
    """Nine mixed prefill + decode steps as split_mixed launches them (16-40 leading decodes, tables
    1-40 pages wide): one build of the prefill kernel, two of the decode kernel (its SPLIT constexpr:
    split plans of one and of several splits). Before STEP_INTS / STEP_POINTERS: 6 and 4, each
    seconds of compilation inside a timed run on a fresh machine."""
    assert run_scenario("mixed_fp16") == {"paged_decode_attention._split_kernel": 2,
                                          "prefill_attention._kernel": 1}


def test_mixed_steps_over_a_quantized_cache_build_each_kernel_once_per_scheme():
    """The same steps over an int8 (plain) and an int4 (channel) cache: per scheme one build of the
    prefill kernel, two of the decode kernel, and one of the per-channel key store, whose block-table
    width changes every step (before: 6, 4 and 3 builds per scheme)."""
    assert run_scenario("mixed_quant") == {"kv_store_channel._store_kernel": 1,
                                           "paged_decode_attention_quant._split_kernel": 4,
                                           "prefill_attention_quant._kernel": 2}


def test_int4_linear_builds_once_per_tile_height():
    """An int4 linear at 1-127 rows: the GEMV twice (one row, or 2-4), the GEMM once per tile height
    of its heuristic (16, 32, 64 rows), not again for row counts divisible by 16 (before: 6 builds)."""
    assert run_scenario("int4_rows") == {"w4a16_gemm._kernel": 3, "w4a16_gemv._kernel": 2}


def test_w8a8_linear_builds_once_per_tile_config():
    """A W8A8 linear at 1-299 rows: one build per config its heuristic picks (5 here), not again for
    row counts equal to 1 or divisible by 16 (before: 11 builds)."""
    assert run_scenario("int8_rows") == {"w8a8._kernel": 5}
