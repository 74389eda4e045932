import os

import pytest
import torch

from runtime_helpers import build_hf, convert

# Tiny matmuls on a shared 2-core box: one thread avoids oversubscription stalls (20x here).
torch.set_num_threads(1)
# These tests pin the CPU semantics (bit-exact against HF on the CPU), also on a GPU machine;
# test_gpu.py runs the engine on CUDA explicitly.
os.environ.setdefault("LMDEPOT_DEVICE", "cpu")

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """kind -> (HF reference model, fp16 workspace tp=1); built once per session, lazily."""
    cache = {}

    def get(kind: str, tp: int = 1, dtype: str = "fp16"):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            cache[kind] = (build_hf(kind, root / "hf"), root)
        model, root = cache[kind]
        if (kind, tp, dtype) not in cache:
            cache[(kind, tp, dtype)] = convert(root / "hf", root / f"ws-tp{tp}-{dtype}", tp=tp, dtype=dtype)
        return model, cache[(kind, tp, dtype)]

    get.hf_dir = lambda kind: cache[kind][1] / "hf"

    return get


@pytest.fixture(scope="session")
def smol_ws(tmp_path_factory):
    return convert("smollm2-135m", tmp_path_factory.mktemp("smol") / "ws", dtype="fp16")


@pytest.fixture(scope="session")
def smol_hf():
    from transformers import AutoModelForCausalLM

    from lmdepot.convert.source import open_source

    model = AutoModelForCausalLM.from_pretrained(open_source("smollm2-135m").hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # the fp16 workspace holds these exact values
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="session")
def smol_llm(smol_ws):
    from lmdepot.runtime.llm import LLM

    llm = LLM(smol_ws, dtype="fp32", num_kv_blocks=128, quiet=True)
    yield llm
    llm.close()
