"""KV cache sizing follows the documented formula and is reported at start."""

from lmdepot.runtime.llm import LLM


def test_block_count_from_budget(tiny, capfd):
    hf, ws = tiny("llama")   # 3 layers, 2 kv heads of 16 dims
    budget = 8 << 20
    llm = LLM(ws, dtype="fp32", cpu_memory_budget=budget, cache_max_entry_count=0.5, cache_block_seq_len=16)
    try:
        runner = llm.engine.runner
        block_bytes = 2 * 3 * 16 * 2 * 16 * 4
        weights = runner.weight_bytes
        assert weights == 4 * sum(p.numel() for p in hf.parameters())   # fp32 copies of exactly the weights
        assert runner.num_blocks == int((budget - weights) * 0.5) // block_bytes
        assert runner.model.layers[0].attention.k_cache.shape == (runner.num_blocks, 16, 2, 16)
        err = capfd.readouterr().err
        assert f"KV cache: {runner.num_blocks} blocks x 16 tokens = {runner.num_blocks * 16} tokens max" in err
    finally:
        llm.close()
