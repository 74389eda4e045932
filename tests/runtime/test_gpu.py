"""The engine on CUDA (Triton ops installed) against HF transformers on the same GPU."""

import pytest
import torch

from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=500)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    hf_dir = make_tiny_checkpoint(root / "hf", "llama", **SHAPE)  # head_dim 64: the Triton decode path
    convert_model(str(hf_dir), root / "ws", ConvertOptions())
    return hf_dir, root / "ws"


def test_decode_steps_follow_hf_on_the_same_gpu(gqa_model):
    from transformers import AutoModelForCausalLM

    hf_dir, ws = gqa_model
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16).cuda().eval()
    llm = LLM(ws, device="cuda", dtype="fp16", cache_block_seq_len=16, num_kv_blocks=64, quiet=True)
    try:
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 490, (n,), generator=gen).tolist() for n in (5, 17, 40, 64)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        for prompt, out in zip(prompts, outs):
            full = torch.tensor([prompt + out.token_ids], device="cuda")
            with torch.no_grad():
                logits = hf(full).logits[0, len(prompt) - 1:-1].float()
            top2 = logits.topk(2).values
            ties = (top2[:, 0] - top2[:, 1]) < 0.05  # fp16 kernels may break near-ties either way
            agree = logits.argmax(-1).cpu() == torch.tensor(out.token_ids)
            assert bool((agree | ties.cpu()).all()), (prompt, out.token_ids)
    finally:
        llm.close()


def test_int4_on_gpu_matches_the_cpu_reference(gqa_model, tmp_path):
    from click.testing import CliRunner
    from runtime_helpers import prefill_logits

    from lmdepot.cli import main

    hf_dir, _ = gqa_model
    ws = tmp_path / "int4"
    res = CliRunner().invoke(main, ["lite", "auto_awq", str(hf_dir), "--method", "rtn", "--w-group-size", "64",
                                    "--dst-path", str(ws)])
    assert res.exit_code == 0, res.output
    ids = list(range(3, 60))
    cpu = LLM(ws, device="cpu", dtype="fp32", num_kv_blocks=16, quiet=True)
    gpu = LLM(ws, device="cuda", dtype="fp16", num_kv_blocks=16, quiet=True)
    try:
        a, b = prefill_logits(cpu.engine, ids), prefill_logits(gpu.engine, ids)
        assert float((a - b).norm() / a.norm()) < 2e-2
    finally:
        cpu.close()
        gpu.close()


@pytest.mark.parametrize("arch, extra", [("llama", {}), ("mistral", {"sliding_window": 20})])
def test_attention_kernels_follow_the_reference_ops(tmp_path, monkeypatch, arch, extra):
    """Fused rope + KV write and the prefill kernel (mixed prefill/decode batches with prefix-cache
    hits, chunked prefill, a sliding window that cuts in) against the reference ops, fp16."""
    from lmdepot.runtime.kernels import prefill_attention as prefill_mod
    from lmdepot.runtime.ops import triton_ops
    from tests.kernels.attention_engine import check_kernels_follow_reference

    hf_dir = make_tiny_checkpoint(tmp_path / "hf", arch, **(SHAPE | extra))
    convert_model(str(hf_dir), tmp_path / "ws", ConvertOptions())
    launches = []
    orig = prefill_mod.prefill_attention
    monkeypatch.setattr(prefill_mod, "prefill_attention", lambda *a, **kw: launches.append(1) or orig(*a, **kw))
    steps, hits = check_kernels_follow_reference(
        tmp_path / "ws", "cuda", {"rope_store_kv": triton_ops.rope_store_kv,
                                  "paged_attention": triton_ops.paged_attention}, SHAPE["vocab_size"])
    assert hits == 4 and launches
    assert any(len(s) > 1 and max(s) > 1 and min(s) == 1 for s in steps)
