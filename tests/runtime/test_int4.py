"""int4 workspaces: the group-wise dequant linear gives the logits of the dequantized weights."""

import shutil

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


def test_int4_workspace_matches_dequantized_reference(tiny, tmp_path):
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
            q = quantize_int4_rtn(w, 32)
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
    cfg.weight_type, cfg.group_size = "int4", 32
    cfg.write(ws / "config.ini")
    Manifest.scan(ws, {}).write(ws)

    ids = list(range(10, 50))
    llm = LLM(ws, dtype="fp32", num_kv_blocks=8, cache_block_seq_len=16, quiet=True)
    try:
        assert llm.engine.runner.model.layers[0].attention.w_qkv.int4
        ours = prefill_logits(llm.engine, ids)
        with torch.no_grad():
            expect = ref(torch.tensor([ids])).logits[0]
        assert float((ours - expect).norm() / expect.norm()) < 1e-4
        out = llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert out.token_ids == hf_greedy(ref, ids, 8)
    finally:
        llm.close()
