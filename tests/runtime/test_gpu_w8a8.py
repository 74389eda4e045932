"""W8A8 on CUDA (Triton fused norm+quant and int8 GEMM through the engine) against the CPU reference."""

import pytest
import torch

from lmdepot.convert.calib_data import CalibParams
from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.convert.smooth_quant import SmoothQuantizer
from lmdepot.runtime.llm import LLM
from tests.quant.conftest import word_text
from tests.runtime.runtime_helpers import prefill_logits
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=500)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_w8a8_on_gpu_matches_the_cpu_reference(tmp_path, dtype):
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", "llama", **SHAPE)
    (tmp_path / "calib.txt").write_text(word_text(2000, vocab=490))
    q = SmoothQuantizer(CalibParams(str(tmp_path / "calib.txt"), 4, 128), 0.5, torch.device("cuda"))
    convert_model(str(hf_dir), tmp_path / "ws", ConvertOptions(quantizer=q))
    # Prefill of 57 tokens (GEMMs with M = 57) and decode steps (M = 1) both go through the kernels.
    ids = list(range(3, 60))
    cpu = LLM(tmp_path / "ws", device="cpu", dtype="fp32", num_kv_blocks=16, quiet=True)
    gpu = LLM(tmp_path / "ws", device="cuda", dtype=dtype, num_kv_blocks=16, quiet=True)
    try:
        a, b = prefill_logits(cpu.engine, ids), prefill_logits(gpu.engine, ids)
        # Same int8 codes up to rare off-by-one roundings of the activations; fp16/bf16 activations
        # between the GEMMs add the rest.
        assert float((a - b.float().cpu()).norm() / a.norm()) < 3e-2
    finally:
        cpu.close()
        gpu.close()
