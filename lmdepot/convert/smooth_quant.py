"""`lite smooth_quant`: SmoothQuant (Xiao et al., 2022) W8A8 — smoothing, then int8 weights per channel.

Activations of LLMs have a few channels with huge magnitudes, which per-token int8 quantization
cannot represent without crushing every other channel. Scaling input channel c of the linears
reading x by s[c] and dividing x[c] by s[c] (folded into the norm or linear producing x) keeps the
float function exactly and moves part of that range into the weights, which quantize per output
channel and take it well. s = absmax(x)^α / absmax(w)^(1-α) per input channel (awq.fixed_scales).

The smoothing map names, per architecture, where each linear group's input comes from. The
converter hook (ConvertOptions.quantizer) calibrates each layer in order on float activations,
smooths it with the statistics, and quantizes every rank's slice to int8 (formats/int8.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmdepot.convert import awq
from lmdepot.convert.arch import LayerTensors
from lmdepot.convert.calib_data import CalibParams
from lmdepot.convert.calib_model import LayerRunner
from lmdepot.convert.calibrate import StatsCollector, StatsWriter, calib_attrs, load_tokens
from lmdepot.convert.linear import TORCH_DTYPES, Linear
from lmdepot.errors import ConvertError
from lmdepot.formats.int8 import quantize_int8

# (input statistics, the producer of that input: a norm or a linear whose output columns are
# divided, the linears reading it). v -> o applies only without GQA, where o's inputs are v's
# outputs one to one; up -> down is exact because down reads silu(gate) * up, linear in up.
LLAMA_MAP = (("attn_in", "attn_norm", ("q", "k", "v")),
             ("o_in", "v", ("o",)),
             ("ffn_in", "ffn_norm", ("gate", "up")),
             ("down_in", "up", ("down",)))
SMOOTHING_MAPS = {arch: LLAMA_MAP for arch in
                  ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM")}


def smoothing_map(arch: str):
    if arch not in SMOOTHING_MAPS:
        raise ConvertError(f"smooth_quant: no smoothing map for architecture {arch}"
                           f" (known: {', '.join(SMOOTHING_MAPS)})")
    return SMOOTHING_MAPS[arch]


@torch.no_grad()
def smooth_layer(layer: LayerTensors, absmax: dict[str, torch.Tensor], alpha: float, smap=LLAMA_MAP) -> LayerTensors:
    """The layer with every group of `smap` smoothed; float function unchanged. absmax: per-channel
    input statistics (calibrate.py's `{name}/absmax`), taken before any smoothing."""
    f32 = (lambda t: None if t is None else t.to(torch.float32).clone())
    lin = dict(zip(("q", "k", "v", "o", "gate", "up", "down"),
                   (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)))
    w = {n: f32(l.weight) for n, l in lin.items()}
    bias = {n: f32(l.bias) for n, l in lin.items()}
    norms = {"attn_norm": f32(layer.attn_norm), "ffn_norm": f32(layer.ffn_norm)}
    for stat, producer, readers in smap:
        if producer in w and w[producer].shape[1] != w[readers[0]].shape[0]:
            continue  # GQA: v's outputs are repeated across query heads, not o's inputs one to one
        s = awq.fixed_scales(absmax[stat].to(torch.float32), [w[n] for n in readers], alpha)
        if producer in norms:
            norms[producer] /= s
        else:
            w[producer] /= s[None, :]
            if bias[producer] is not None:
                bias[producer] /= s
        for n in readers:
            w[n] *= s[:, None]
    out = {n: Linear(w[n], bias=bias[n]) for n in w}
    return LayerTensors((out["q"], out["k"], out["v"]), out["o"], out["gate"], out["up"], out["down"],
                        norms["attn_norm"], norms["ffn_norm"])


@dataclass
class Int8Linear:
    """One rank's int8 slice of a linear, as the converter writes it."""
    qweight: torch.Tensor          # int8 (in, out)
    scales: torch.Tensor           # float32 (out,)
    bias: torch.Tensor | None = None

    def tensors(self, prefix: str, dtype: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.to(TORCH_DTYPES[dtype])
        return out


def quantize_linear_int8(lin: Linear) -> Int8Linear:
    q, scales = quantize_int8(lin.weight)
    return Int8Linear(q, scales, lin.bias)


class SmoothQuantizer:
    """ConvertOptions.quantizer of `lite smooth_quant` (see converter.py for the hook protocol)."""

    weight_type = "int8"
    group_size = 0

    def __init__(self, calib: CalibParams, alpha: float = 0.5, device=None, stats_dir: str | Path | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ConvertError(f"--alpha {alpha}: must be between 0 and 1")
        self.calib, self.alpha, self.device, self.stats_dir = calib, alpha, device, stats_dir
        self.provenance = {"method": "smooth_quant", "w_bits": 8, "a_bits": 8, "alpha": alpha}

    def begin(self, src, cfg):
        self.smap = smoothing_map(cfg.model_arch)
        tokens, digest = load_tokens(src, self.calib)
        attrs = calib_attrs(src, self.calib, digest, tokens.shape[0])
        self.provenance["calib"] = attrs["calib"]
        self.runner = LayerRunner(src, cfg, self.device)
        self.hidden = self.runner.embed(tokens)
        self.writer = None if self.stats_dir is None else StatsWriter(self.stats_dir, cfg, attrs)

    def layer(self, i: int, layer: LayerTensors) -> LayerTensors:
        if any(lin.quantized for lin in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)):
            raise ConvertError("smooth_quant needs floating-point weights; the checkpoint is already quantized")
        mod = self.runner.module(layer)
        collector = StatsCollector()
        with collector.hooked(mod):
            self.hidden = self.runner.forward(mod, self.hidden, kv_sink=collector.kv_sink)
        if self.writer is not None:
            self.writer.write(i, collector.result())
        absmax = {name: acc.absmax.cpu() for name, acc in collector.inputs.items()}
        return smooth_layer(layer, absmax, self.alpha, self.smap)

    def linear(self, lin: Linear) -> Int8Linear:
        return quantize_linear_int8(lin)

    def end(self):
        if self.writer is not None:
            self.writer.close()
