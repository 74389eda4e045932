"""int4 workspaces: the group-wise dequant linear gives the logits of the dequantized weights."""

import shutil

import pytest
import torch

from runtime_helpers import hf_greedy, prefill_logits

from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.int4 import dequantize_int4, quantize_int4_rtn
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import load_tensors, save_tensors
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams

HF_NAMES = {"feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
            "attention.wo": "self_attn.o_proj"}


def _int4_workspace(tiny, tmp_path, group: int = 32):
    """The tiny llama's fp16 workspace with every linear quantized to int4 (RTN, `group`), and the HF
    model holding the dequantized weights: the reference for its logits."""
    hf, ws16 = tiny("llama")
    ws = tmp_path / "ws"
    shutil.copytree(ws16, ws)
    cfg = WorkspaceConfig.read(ws / "config.ini")
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    d = cfg.size_per_head
    for i in range(cfg.num_layer):
        path = ws / f"weights/layers.{i}.0.safetensors"
        tensors = load_tensors(path)
        layer = ref.model.layers[i]
        for name in ("attention.w_qkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"):
            w = tensors.pop(f"{name}.weight").float()
            q = quantize_int4_rtn(w, group)
            tensors |= {f"{name}.{k}": v for k, v in q.items()}
            deq = dequantize_int4(q["qweight"], q["scales"], q["zeros"], w.shape[0]).t()
            with torch.no_grad():
                if name == "attention.w_qkv":
                    nq, nkv = cfg.head_num * d, cfg.kv_head_num * d
                    layer.self_attn.q_proj.weight.copy_(deq[:nq])
                    layer.self_attn.k_proj.weight.copy_(deq[nq:nq + nkv])
                    layer.self_attn.v_proj.weight.copy_(deq[nq + nkv:])
                else:
                    layer.get_submodule(HF_NAMES[name]).weight.copy_(deq)
        save_tensors(path, tensors)
    cfg.weight_type, cfg.group_size = "int4", group
    cfg.write(ws / "config.ini")
    Manifest.scan(ws, {}).write(ws)
    return ws, ref


def _assert_matches_reference(llm, ref, prompts):
    """Prefill logits within 1e-4 (relative norm) of the reference; greedy tokens equal HF's."""
    for ids in prompts:
        ours = prefill_logits(llm.engine, ids)
        with torch.no_grad():
            expect = ref(torch.tensor([ids])).logits[0]
        assert float((ours - expect).norm() / expect.norm()) < 1e-4
    ids = prompts[0]
    out = llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert out.token_ids == hf_greedy(ref, ids, 8)


def test_int4_workspace_matches_dequantized_reference(tiny, tmp_path):
    ws, ref = _int4_workspace(tiny, tmp_path)
    llm = LLM(ws, dtype="fp32", num_kv_blocks=8, cache_block_seq_len=16, quiet=True)
    try:
        assert llm.engine.runner.model.layers[0].attention.w_qkv.int4
        _assert_matches_reference(llm, ref, [list(range(10, 50))])
    finally:
        llm.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU kernels through the CPU interpreter")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_repacked_int4_path_matches_dequantized_reference(tiny, tmp_path, monkeypatch, group):
    """The GPU's int4 path on the CPU, through Triton's interpreter: every linear repacked as Linear does
    on a GPU (triton_ops.int4_layout) and the op dispatching by rows (triton_ops.linear_int4): a
    40-token prefill through the GEMM, a 130-token one through dequantize + matmul, decode steps
    through the GEMV. Inputs of 64 and 96 rows: groups of 64 and 128 pad their last group."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.model import Linear
    from lmdepot.runtime.ops import triton_ops

    ws, ref = _int4_workspace(tiny, tmp_path, group)
    monkeypatch.setitem(ops._TABLE, "linear_int4", triton_ops.linear_int4)
    llm = LLM(ws, dtype="fp32", num_kv_blocks=10, cache_block_seq_len=16, quiet=True)
    try:
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
        assert len(linears) == 4 * 3
        for lin in linears:
            assert "qweight" in lin.int4_weight   # the CPU keeps the workspace layout ...
            lin.int4_weight = triton_ops.int4_layout(lin.int4_weight)   # ... which a GPU repacks
            assert lin.int4_weight["group"] == group
        _assert_matches_reference(llm, ref, [list(range(10, 50)), [(7 * i) % 150 + 3 for i in range(130)]])
    finally:
        llm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_gpu_keeps_one_repacked_copy(tiny, tmp_path, group):
    """On a GPU every int4 Linear holds the repacked layout only (every group format v1 allows), and
    fp16 logits of a GEMM-sized and a dequantize-sized prefill stay within 2e-2 of the dequantized
    float32 reference."""
    from lmdepot.runtime.model import Linear

    ws, ref = _int4_workspace(tiny, tmp_path, group)
    llm = LLM(ws, device="cuda", dtype="fp16", num_kv_blocks=10, cache_block_seq_len=16, quiet=True)
    try:
        runner = llm.engine.runner
        for lin in (m for m in runner.model.modules() if isinstance(m, Linear)):
            w = lin.int4_weight
            assert set(w) == {"qt", "scales", "zeros", "group"} and lin.qweight is w["qt"]
            assert all(t.is_cuda for t in w.values() if isinstance(t, torch.Tensor))
        for ids in (list(range(10, 50)), [(7 * i) % 150 + 3 for i in range(130)]):
            ours = prefill_logits(llm.engine, ids).cpu()
            with torch.no_grad():
                expect = ref(torch.tensor([ids])).logits[0]
            assert float((ours - expect).norm() / expect.norm()) < 2e-2
    finally:
        llm.close()
