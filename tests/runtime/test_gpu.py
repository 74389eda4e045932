"""The engine on CUDA (Triton ops installed) against HF transformers on the same GPU."""

import pytest
import torch

from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams
from runtime_helpers import record_graph_and_eager_steps
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


# --- CUDA graphs for decode steps (runtime/cuda_graph.py) ------------------------------------------
def _mixed_prompts():
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 490, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 5, 12, 21, 8, 40, 2, 15)]
    # different lengths: sequences finish at different steps, so the batch walks down the buckets
    return prompts, [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]


GRAPH_LLM = dict(device="cuda", dtype="fp16", cache_block_seq_len=16, num_kv_blocks=64, max_batch_size=16,
                 session_len=256, quiet=True)


def _assert_steps_agree(pairs) -> None:
    """Logits within 1e-2 relative and the same argmax wherever the top two are not near a tie."""
    for n, eager, out in pairs:
        assert out.shape == eager.shape == (n, 500)
        assert float((out - eager).abs().max() / eager.abs().max()) < 1e-2
        top2 = eager.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05
        assert torch.equal(out.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_cuda_graph_decode_logits_match_eager(gqa_model):
    """Every decode step that replays a graph also runs eagerly on the same metadata first."""
    _, ws = gqa_model
    llm = LLM(ws, **GRAPH_LLM)
    try:
        runner = llm.engine.runner
        graphs = runner.graphs
        assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8, 16]
        pairs = record_graph_and_eager_steps(runner, graphs)
        prompts, params = _mixed_prompts()
        for n in (1, 2, 3, 5, 8, 11):
            llm.generate(prompts[:n], params[:n])
        assert {1, 2, 4, 8, 16} <= graphs.used and len(pairs) > 50
        _assert_steps_agree(pairs)
    finally:
        llm.close()


def test_cuda_graph_and_eager_engines_generate_the_same_greedy_tokens(gqa_model):
    from runtime_helpers import prefill_logits

    _, ws = gqa_model
    prompts, params = _mixed_prompts()
    outs = {}
    for eager in (True, False):
        with LLM(ws, eager=eager, **GRAPH_LLM) as llm:
            assert (llm.engine.runner.graphs is None) == eager
            outs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
    assert all(len(a) == len(b) for a, b in zip(outs[True], outs[False]))
    with LLM(ws, eager=True, **GRAPH_LLM) as llm:
        for prompt, a, b in zip(prompts, outs[True], outs[False]):
            if a != b:   # fp16 kernels of other shapes may only flip a near-tie
                k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                top2 = prefill_logits(llm.engine, prompt + a[:k])[-1].topk(2).values
                assert float(top2[0] - top2[1]) < 0.05, (prompt, a, b)


def test_async_decode_steps_give_the_sync_tokens_on_the_gpu(gqa_model):
    """async_steps on/off (engine.py: step n+1 launched before step n's tokens are read back, its
    input ids copied on the device). Batches whose sequences all end together replay the same graphs
    on the same inputs either way: equal tokens, greedy and seeded. Batches that shrink step by step
    run a lookahead step at the old bucket, so fp16 may flip a near-tie only."""
    from runtime_helpers import prefill_logits

    _, ws = gqa_model
    prompts, mixed = _mixed_prompts()
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = {}
    for on in (False, True):
        with LLM(ws, async_steps=on, **GRAPH_LLM) as llm:
            runs = [[o.token_ids for o in llm.generate(prompts, p)] for p in (greedy, seeded, mixed)]
            eng = llm.engine
            assert (eng.steps_ahead > 20) == on and eng.bm.num_free == eng.bm.num_blocks and eng._inflight is None
            outs[on] = runs
    assert outs[True][0] == outs[False][0] and outs[True][1] == outs[False][1]
    with LLM(ws, eager=True, **GRAPH_LLM) as llm:
        for prompt, a, b in zip(prompts, outs[False][2], outs[True][2]):
            assert len(a) == len(b)
            if a != b:
                k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                top2 = prefill_logits(llm.engine, prompt + a[:k])[-1].topk(2).values
                assert float(top2[0] - top2[1]) < 0.05, (prompt, a, b)


def test_engine_close_releases_the_graphs_and_their_pool(gqa_model):
    _, ws = gqa_model
    llm = LLM(ws, **{**GRAPH_LLM, "max_batch_size": 64})
    runner = llm.engine.runner
    graphs = runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8, 16, 32, 48, 64]
    llm.generate([list(range(3, 30))] * 3, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    before = torch.cuda.memory_reserved()
    runner.close_graphs()   # what engine close does, with the model and KV cache still alive
    assert runner.graphs is None and not graphs.graphs and not graphs.outputs and graphs.pool is None
    assert torch.cuda.memory_reserved() < before   # the private pool went back to the driver
    # the engine keeps working, eagerly
    assert llm.generate([list(range(3, 30))], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    llm.close()
    assert llm.engine.runner is None


def test_gpu_sampler_equals_the_cpu_sampler():
    from lmdepot.runtime import sampler
    from lmdepot.runtime.sequence import Sequence

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=gen) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.4, logprobs=3),
              SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=3),
              SamplingParams(temperature=1.2, top_p=0.5, seed=4), SamplingParams(top_k=1, logprobs=0)]

    def seqs(device):
        out = []
        for i, p in enumerate(params):
            s = Sequence(list(range(10, 30 + i)), p, device=device)
            s.token_ids += [11, 12, 12][:i]
            out.append(s)
        return out

    cpu, gpu = seqs("cpu"), seqs("cuda")
    assert torch.allclose(sampler.apply_penalties(logits.cuda(), gpu).cpu(), sampler.apply_penalties(logits, cpu))
    f = [[p.temperature or 1.0 for p in params], [p.top_k for p in params], [p.top_p for p in params],
         [p.min_p for p in params]]
    masks = [torch.isfinite(sampler.filter_logits(x, *f)).cpu() for x in (logits, logits.cuda())]
    assert torch.equal(masks[0], masks[1])
    t_cpu, lp_cpu = sampler.sample(logits, cpu)
    t_gpu, lp_gpu = sampler.sample(logits.cuda(), gpu)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert [t_cpu[i] for i in greedy] == [t_gpu[i] for i in greedy]
    assert lp_gpu[1]["top"].keys() == lp_cpu[1]["top"].keys() and lp_gpu[5] == {**lp_gpu[5], "top": {}}
    # seeded rows draw from their own CUDA generator: the same tokens when sampled alone
    for i in (3, 4):
        again = seqs("cuda")[i]
        assert sampler.sample(logits[i:i + 1].cuda(), [again])[0] == [t_gpu[i]]


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


# --- CUDA graphs over a quantized KV cache (quant_policy 8 / 4) ----------------------------------------
@pytest.mark.parametrize("policy, scheme", [(8, "plain"), (4, "channel")])
def test_cuda_graphs_over_a_quantized_kv_cache_match_eager(gqa_model, capsys, policy, scheme):
    """The quantized cache's store and decode kernels are captured (no fallback warning), and every
    decode step that replays a graph first runs eagerly on the same metadata: same greedy token
    wherever the top two logits are apart, logits within fp16 noise. Rerunning a step's store is
    harmless: per-token codes are rewritten the same, and a channel block requantized from its own
    codes keeps them."""
    _, ws = gqa_model
    capsys.readouterr()
    llm = LLM(ws, quant_policy=policy, kv_scheme=scheme, **GRAPH_LLM)
    try:
        runner = llm.engine.runner
        graphs = runner.graphs
        assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8, 16]
        assert "capture failed" not in capsys.readouterr().err
        assert runner.model.layers[0].attention.kv_quant.bits == policy
        pairs = record_graph_and_eager_steps(runner, graphs)
        prompts, params = _mixed_prompts()
        for n in (1, 3, 11):
            llm.generate(prompts[:n], params[:n])
        assert {1, 2, 4, 16} <= graphs.used and len(pairs) > 30
        _assert_steps_agree(pairs)
    finally:
        llm.close()


def test_a_quantized_cache_without_its_kernels_decodes_eagerly(gqa_model):
    """Groups smaller than a head have no Triton kernel: their torch reference loops over the
    sequences in python, so no graph is captured (and generation still works)."""
    _, ws = gqa_model
    with LLM(ws, quant_policy=8, kv_group_size=32, **GRAPH_LLM) as llm:
        assert llm.engine.runner.graphs is None
        assert llm.generate([list(range(3, 30))], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
