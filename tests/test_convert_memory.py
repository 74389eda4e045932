"""The converter holds about one layer at a time: peak RSS grows far less than the checkpoint size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_models import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, INTER, VOCAB = 12, 512, 4096, 512

_MEASURE = """
import json, sys
from lmdepot.convert.converter import ConvertOptions, convert_model
def status(key):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))
base = status('VmRSS')
convert_model(sys.argv[1], sys.argv[2], ConvertOptions(tp=2))
print(json.dumps({"base": base, "peak": status('VmHWM')}))
"""


def _write_checkpoint(out: Path) -> tuple[int, int]:
    """A Llama-shaped fp32 checkpoint written tensor by tensor; returns (bytes per layer, total bytes)."""
    out.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": torch.randn(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q", "k", "v", "o"):
            tensors[f"{p}.self_attn.{name}_proj.weight"] = torch.randn(HIDDEN, HIDDEN)
        tensors[f"{p}.mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN)
        tensors[f"{p}.mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN)
        tensors[f"{p}.mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    save_file(tensors, out / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "max_position_embeddings": 512, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    make_tokenizer(out, VOCAB)
    layer = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)
    return layer, (out / "model.safetensors").stat().st_size


def test_peak_memory_stays_near_one_layer(tmp_path):
    layer_bytes, total = _write_checkpoint(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "hf"), str(tmp_path / "ws")],
                          capture_output=True, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    embeddings = 2 * 4 * VOCAB * HIDDEN
    # One fp32 layer read, its fp16 rank slices and transposed copies: well under 4 layers' worth.
    bound = 4 * layer_bytes + embeddings + (32 << 20)
    assert growth < bound, f"peak grew {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"
    assert bound < total * 0.6  # the bound is meaningful: loading everything would break it
