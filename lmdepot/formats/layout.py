"""File and tensor names of a workspace (format v1). See docs/format.md."""

from __future__ import annotations

import re

FORMAT_VERSION = 1
CONFIG_FILE = "config.ini"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_DIR = "weights"

# Tensors of one decoder layer, TurboMind names. Linear weights are stored (in_features, out_features).
W_QKV = "attention.w_qkv"
W_O = "attention.wo"
W_GATE = "feed_forward.w1"
W_UP = "feed_forward.w3"
W_DOWN = "feed_forward.w2"
ATTN_NORM = "attention_norm.weight"
FFN_NORM = "ffn_norm.weight"
LINEARS = (W_QKV, W_O, W_GATE, W_UP, W_DOWN)
COLUMN_PARALLEL = (W_QKV, W_GATE, W_UP)
ROW_PARALLEL = (W_O, W_DOWN)

# Tensors of global.{rank}.safetensors; embeddings and lm_head are split by vocab rows.
TOK_EMBEDDINGS = "tok_embeddings.weight"
FINAL_NORM = "norm.weight"
LM_HEAD = "output.weight"

# Suffixes of a linear's tensors: plain weights, int4 AWQ-style group quantization, or int8
# per-output-channel quantization (W8A8; qweight is int8 (in, out), scales float32 (out,)).
PLAIN_SUFFIXES = ("weight",)
INT4_SUFFIXES = ("qweight", "scales", "zeros")
INT8_SUFFIXES = ("qweight", "scales")


def layer_file(layer: int, rank: int) -> str:
    return f"{WEIGHTS_DIR}/layers.{layer}.{rank}.safetensors"


def global_file(rank: int) -> str:
    return f"{WEIGHTS_DIR}/global.{rank}.safetensors"


def kv_scale_file(layer: int, rank: int) -> str:
    return f"{WEIGHTS_DIR}/layers.{layer}.past_kv_scale.{rank}.weight"


_LAYER_RE = re.compile(r"^weights/layers\.(\d+)\.(\d+)\.safetensors$")
_KV_RE = re.compile(r"^weights/layers\.(\d+)\.past_kv_scale\.(\d+)\.weight$")
_GLOBAL_RE = re.compile(r"^weights/global\.(\d+)\.safetensors$")


def classify(path: str) -> tuple[int | None, int | None]:
    """(layer, rank) of a workspace file path; None where the file is not per-layer / per-rank."""
    for pattern in (_LAYER_RE, _KV_RE):
        m = pattern.match(path)
        if m:
            return int(m.group(1)), int(m.group(2))
    m = _GLOBAL_RE.match(path)
    if m:
        return None, int(m.group(1))
    return None, None
