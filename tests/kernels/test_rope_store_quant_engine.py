"""The engine over an int8 / int4 KV cache with rope fused into the quantized store
(triton_ops.rope_store_kv_quant_kernel, Triton's interpreter on the CPU), end to end:
- against the unfused kernels (apply_rope, then the store kernels): the same cache bytes, so the
  same logits bit for bit and the same greedy tokens, step after step;
- against the reference ops (the CPU default): the same greedy tokens up to near-ties.
The scenario (tests/kernels/attention_engine.py) has prefix-cache hits, chunked prefill beside
decodes and partial pages; the RoPE variants come from the model's cos/sin (llama3 scaling,
dynamic NTK past max_position_embeddings, where each sequence gets its own frequencies)."""

import pytest
import torch

from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.runtime import ops
from lmdepot.runtime.kernels import rope_store_kv_quant as fused_mod
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.ops import triton_ops
from lmdepot.runtime.sequence import SamplingParams
from tests.kernels.attention_engine import check_kernels_follow_reference, generate_with_spy, scenario_prompts
from tests.tiny_models import make_tiny_checkpoint

VOCAB = 250
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)   # head_dim 32, GQA 2
ROPES = {"llama3": ("llama3-tied", {}),
         "dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32})}
FUSED = {"rope_store_kv_quant": triton_ops.rope_store_kv_quant_kernel}
UNFUSED = {"rope_store_kv_quant": ops.unfused_rope_store_kv_quant, "store_kv_quant": triton_ops.store_kv_quant_kernel}


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    cache = {}

    def get(rope):
        if rope not in cache:
            root = tmp_path_factory.mktemp(rope)
            arch, extra = ROPES[rope]
            hf = make_tiny_checkpoint(root / "hf", arch, **(SHAPE | extra))
            convert_model(str(hf), root / "ws", ConvertOptions())
            cache[rope] = root / "ws"
        return cache[rope]
    return get


def _run(ws, kernel_ops, engine_kw):
    """Greedy outputs of the scenario and every step's logits, with `kernel_ops` registered."""
    saved = {name: ops.get(name) for name in ("rope_store_kv_quant", "store_kv_quant")}
    first, batch = scenario_prompts(VOCAB)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    try:
        for name, fn in kernel_ops.items():
            ops.register(name, fn)
        with LLM(ws, dtype="fp32", cache_block_seq_len=16, num_kv_blocks=64, max_batch_size=8,
                 max_num_batched_tokens=24, session_len=128, quiet=True, **engine_kw) as llm:
            logits, run = [], llm.engine.runner.run
            llm.engine.runner.run = lambda meta, host=True: logits.append(run(meta, host).clone()) or logits[-1]
            outs, steps, hits = generate_with_spy(llm, first, batch, params)
    finally:
        for name, fn in saved.items():
            ops.register(name, fn)
    return outs, logits, steps, hits


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors")
@pytest.mark.parametrize("policy, scheme, rope", [(8, "plain", "dynamic"), (4, "rotate", "llama3"),
                                                  (4, "channel", "dynamic")])
def test_fused_rope_store_equals_unfused_kernels(workspaces, monkeypatch, policy, scheme, rope):
    ws = workspaces(rope)
    launches = []
    orig = fused_mod.rope_store_kv_quant
    monkeypatch.setattr(fused_mod, "rope_store_kv_quant", lambda *a, **kw: launches.append(1) or orig(*a, **kw))
    kw = dict(quant_policy=policy, kv_scheme=scheme)
    outs, logits, steps, hits = _run(ws, FUSED, kw)
    assert launches and hits == 4                                        # the fused kernel ran; prefix hits
    assert any(len(s) > 1 and max(s) > 1 and min(s) == 1 for s in steps)  # prefill chunks beside decodes
    want_outs, want_logits, _, _ = _run(ws, UNFUSED, kw)
    assert outs == want_outs and len(logits) == len(want_logits)
    for got, want in zip(logits, want_logits):
        assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_gpu.py runs the installed ops")
def test_engine_with_fused_rope_store_follows_reference(workspaces):
    """int4 channel keys (the default int4 scheme; rotated per-token values) against the reference ops."""
    check_kernels_follow_reference(workspaces("dynamic"), "cpu", FUSED, VOCAB, max_tokens=5,
                                   engine_kw=dict(quant_policy=4, kv_scheme="channel", session_len=128))
