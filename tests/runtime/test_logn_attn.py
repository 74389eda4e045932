"""use_logn_attn (Qwen's log-n attention scaling): conversion, config.ini, and the engine against a
float64 reference past the training length (HF's Llama has no such switch: the reference scales the
queries of a float64 HF model after RoPE)."""

from __future__ import annotations

import math

import pytest
import torch

from lmdepot.convert.arch import model_keys
from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.runtime.model import logn_factors

MAX_LEN = 16


def test_factors_against_float64():
    pos = torch.arange(0, 60)
    n = (pos + 1).double()
    ref = torch.where(n > MAX_LEN, n.log() / math.log(MAX_LEN), torch.ones_like(n))
    got = logn_factors(pos, MAX_LEN)
    assert (got[:MAX_LEN] == 1).all() and (got[MAX_LEN:] > 1).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


def test_conversion_reads_use_logn_attn_and_qwen1_seq_length():
    base = {"num_attention_heads": 8, "hidden_size": 64, "vocab_size": 250, "num_hidden_layers": 2,
            "intermediate_size": 128, "max_position_embeddings": 8192}
    assert model_keys(base, "LlamaForCausalLM")["use_logn_attn"] == 0
    keys = model_keys(base | {"use_logn_attn": True, "seq_length": 2048}, "LlamaForCausalLM")
    assert keys["use_logn_attn"] == 1 and keys["max_position_embeddings"] == 2048
    cfg = WorkspaceConfig(model_name="m", **keys).validate()
    assert "use_logn_attn = 1" in cfg.to_ini()
    assert WorkspaceConfig.from_ini(cfg.to_ini()).use_logn_attn == 1


@pytest.fixture
def logn_ws(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("llama", max_position_embeddings=MAX_LEN, use_logn_attn=True)
    ws = tmp_path / "ws"
    convert_model(str(hf), ws, ConvertOptions(session_len=128))
    return hf, ws


def _reference(hf, ids, logn: bool) -> torch.Tensor:
    """float64 HF Llama, queries multiplied by the log-n factor of their position after RoPE."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    orig = modeling_llama.apply_rotary_pos_emb

    def scaled(q, k, cos, sin, *args, **kwargs):
        q, k = orig(q, k, cos, sin, *args, **kwargs)
        n = torch.arange(1, q.shape[2] + 1, dtype=torch.float64)
        f = torch.where(n > MAX_LEN, n.log() / math.log(MAX_LEN), torch.ones_like(n))
        return q * f[None, None, :, None], k

    try:
        if logn:
            modeling_llama.apply_rotary_pos_emb = scaled
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]
    finally:
        modeling_llama.apply_rotary_pos_emb = orig


def test_engine_matches_float64_reference_past_the_training_length(logn_ws):
    from lmdepot.runtime.llm import LLM
    from lmdepot.runtime.sequence import SamplingParams
    from tests.runtime.runtime_helpers import prefill_logits

    hf, ws = logn_ws
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert cfg.use_logn_attn == 1 and cfg.max_position_embeddings == MAX_LEN
    ids = torch.randint(3, 240, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ref, plain = _reference(hf, ids, True), _reference(hf, ids, False)
    llm = LLM(str(ws), dtype="fp32", num_kv_blocks=8, cache_block_seq_len=8, session_len=128, quiet=True)
    try:
        ours = prefill_logits(llm.engine, ids).double()
        # Decode steps past the limit get the factor too: greedy tokens equal the reference's.
        out = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).token_ids
    finally:
        llm.close()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(ours[:MAX_LEN], ref[:MAX_LEN]) < 1e-5      # up to the limit: unchanged
    assert rel(ours, ref) < 1e-5
    assert rel(ref[MAX_LEN:], plain[MAX_LEN:]) > 1e-3     # the scaling matters past the limit
    seq = list(ids)
    for _ in range(6):
        seq.append(int(_reference(hf, seq, True)[-1].argmax()))
    assert out == seq[len(ids):]
