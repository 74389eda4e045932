"""The converter hook of `lite auto_awq`: calibrate, smooth and clip each layer, then quantize every
rank's slice to int4 (see ConvertOptions.quantizer).

Layers are processed in order, each once: its float forward over all calibration samples gives the
next layer's input (AWQ's convention: later layers see float activations), the statistics, and, on
the first `search_tokens` worth of samples, the activations the searches minimize errors on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmdepot.convert import awq
from lmdepot.convert.arch import LayerTensors
from lmdepot.convert.calib_data import CalibParams
from lmdepot.convert.calib_model import LayerRunner
from lmdepot.convert.calibrate import StatsCollector, StatsWriter, calib_attrs, load_tokens
from lmdepot.convert.linear import Linear
from lmdepot.convert.quant_groups import check_group_size, quantize_linear
from lmdepot.errors import ConvertError

METHODS = ("awq", "rtn")
SEARCH_TOKENS = 4096


@dataclass
class QuantParams:
    method: str = "awq"
    w_bits: int = 4
    group_size: int = 128
    search_scale: bool = False
    calib: CalibParams = field(default_factory=CalibParams)
    search_tokens: int = SEARCH_TOKENS

    def check(self) -> "QuantParams":
        if self.w_bits != 4:
            raise ConvertError(f"--w-bits {self.w_bits}: only 4-bit weights are supported")
        if self.method not in METHODS:
            raise ConvertError(f"--method {self.method}: must be awq or rtn")
        check_group_size(self.group_size)
        return self


class AwqQuantizer:
    def __init__(self, params: QuantParams, device=None, stats_dir: str | Path | None = None):
        self.params = params.check()
        self.group_size = params.group_size
        self.device, self.stats_dir = device, stats_dir
        self.ratios: dict[int, dict[str, float]] = {}
        self.provenance = {"method": params.method, "w_bits": params.w_bits, "group_size": params.group_size,
                           "search_scale": params.search_scale if params.method == "awq" else False}

    @property
    def calibrating(self) -> bool:
        return self.params.method == "awq" or self.stats_dir is not None

    def begin(self, src, cfg):
        self.cfg, self.writer = cfg, None
        if not self.calibrating:
            return
        tokens, digest = load_tokens(src, self.params.calib)
        attrs = calib_attrs(src, self.params.calib, digest, tokens.shape[0])
        if self.params.method == "awq":
            self.provenance["calib"] = attrs["calib"]
        self.runner = LayerRunner(src, cfg, self.device)
        self.hidden = self.runner.embed(tokens)
        self.n_search = max(1, min(tokens.shape[0], self.params.search_tokens // tokens.shape[1]))
        if self.stats_dir is not None:
            self.writer = StatsWriter(self.stats_dir, cfg, attrs)

    def linear(self, lin: Linear) -> Linear:
        return quantize_linear(lin, self.group_size)

    def end(self):
        if self.writer is not None:
            self.writer.close()

    def layer(self, i: int, layer: LayerTensors) -> LayerTensors:
        if not self.calibrating:
            return layer
        mod = self.runner.module(layer)
        collector = StatsCollector()
        with collector.hooked(mod):
            out = self.runner.forward(mod, self.hidden, kv_sink=collector.kv_sink)
        if self.writer is not None:
            self.writer.write(i, collector.result())
        if self.params.method == "awq":
            layer = self._smooth(i, layer, mod, collector)
        self.hidden = out
        return layer

    # --- AWQ ---------------------------------------------------------------------------------------
    def _capture(self, mod) -> dict[str, torch.Tensor]:
        """Inputs of every linear group and the float block outputs, on the search samples."""
        seen: dict[str, list] = {}

        def keep_input(name):
            return lambda m, args: seen.setdefault(name, []).append(args[0])

        def keep_output(name):  # self_attn returns (output, weights), the MLP a tensor
            return lambda m, args, out: seen.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)

        handles = [mod.self_attn.q_proj.register_forward_pre_hook(keep_input("attn_in")),
                   mod.self_attn.o_proj.register_forward_pre_hook(keep_input("o_in")),
                   mod.mlp.gate_proj.register_forward_pre_hook(keep_input("ffn_in")),
                   mod.mlp.down_proj.register_forward_pre_hook(keep_input("down_in")),
                   mod.self_attn.register_forward_hook(keep_output("attn_out")),
                   mod.mlp.register_forward_hook(keep_output("mlp_out"))]
        try:
            self.runner.forward(mod, self.hidden[:self.n_search])
        finally:
            for h in handles:
                h.remove()
        return {k: torch.cat(v) for k, v in seen.items()}

    @contextlib.contextmanager
    def _swapped(self, linears, weights):
        old = [m.weight for m in linears]
        for m, w in zip(linears, weights):
            m.weight = torch.nn.Parameter(w.t(), requires_grad=False)
        try:
            yield
        finally:
            for m, w in zip(linears, old):
                m.weight = w

    @torch.no_grad()
    def _smooth(self, i: int, layer: LayerTensors, mod, collector: StatsCollector) -> LayerTensors:
        search, g, tp = self.params.search_scale, self.group_size, self.cfg.tensor_para_size
        dev = self.runner.device
        w = {n: lin.weight.to(dev, torch.float32).clone() for n, lin in
             zip(("q", "k", "v", "o", "gate", "up", "down"), (*layer.qkv, layer.o, layer.gate, layer.up, layer.down))}
        v_bias = None if layer.qkv[2].bias is None else layer.qkv[2].bias.to(dev, torch.float32).clone()
        norms = {"attn": layer.attn_norm.to(dev, torch.float32).clone(),
                 "ffn": layer.ffn_norm.to(dev, torch.float32).clone()}
        stats = {n: acc for n, acc in collector.inputs.items()}
        x = self._capture(mod) if search else {}
        flat = (lambda t: t.reshape(-1, t.shape[-1]))
        attn, mlp = mod.self_attn, mod.mlp
        ratios = {}

        def scales(name, input_name, names, parts, block=None, reference=None):
            if not search:
                return awq.fixed_scales(stats[input_name].absmax.float(), [w[n] for n in names])
            xm = flat(x[input_name]).abs().mean(dim=0)
            s, ratios[name], _ = awq.search_scales(xm, [w[n] for n in names], parts, g, block, reference)
            return s

        # input_layernorm -> q, k, v; block: the attention.
        def attn_block(eff):
            with self._swapped((attn.q_proj, attn.k_proj, attn.v_proj), eff):
                return self.runner.attention(mod, x["attn_in"])
        s = scales("qkv", "attn_in", ("q", "k", "v"), (1, 1, 1), attn_block, x.get("attn_out"))
        norms["attn"] /= s
        for n in ("q", "k", "v"):
            w[n] *= s[:, None]
        if search:
            x["attn_in"] = x["attn_in"] / s
        # v -> o, only without GQA (o's inputs are then exactly v's outputs, one to one).
        if w["v"].shape[1] == w["o"].shape[0]:
            s = scales("vo", "o_in", ("o",), (tp,), lambda eff: flat(x["o_in"]) @ eff[0],
                       flat(x["o_in"]) @ w["o"] if search else None)
            w["v"] /= s[None, :]
            if v_bias is not None:
                v_bias /= s
            w["o"] *= s[:, None]
            if search:
                x["o_in"] = x["o_in"] / s
        # post_attention_layernorm -> gate, up; block: the MLP.
        def mlp_block(eff):
            with self._swapped((mlp.gate_proj, mlp.up_proj), eff):
                return mlp(x["ffn_in"])
        s = scales("gate_up", "ffn_in", ("gate", "up"), (1, 1), mlp_block, x.get("mlp_out"))
        norms["ffn"] /= s
        w["gate"] *= s[:, None]
        w["up"] *= s[:, None]
        if search:
            x["ffn_in"] = x["ffn_in"] / s
        # up -> down.
        s = scales("down", "down_in", ("down",), (tp,), lambda eff: flat(x["down_in"]) @ eff[0],
                   flat(x["down_in"]) @ w["down"] if search else None)
        w["up"] /= s[None, :]
        w["down"] *= s[:, None]
        if search:
            x["down_in"] = x["down_in"] / s
            # q and k are not clipped: their errors are amplified by the softmax (as in AWQ).
            for n, inp, parts in (("v", "attn_in", 1), ("o", "o_in", tp), ("gate", "ffn_in", 1),
                                  ("up", "ffn_in", 1), ("down", "down_in", tp)):
                w[n] = awq.search_clip(w[n], flat(x[inp]), g, parts)
        self.ratios[i] = ratios
        cpu = (lambda t: t.cpu())
        lin = (lambda n, bias: Linear(cpu(w[n]), bias=bias))
        qkv = (lin("q", layer.qkv[0].bias), lin("k", layer.qkv[1].bias),
               lin("v", None if v_bias is None else cpu(v_bias)))
        return LayerTensors(qkv, lin("o", layer.o.bias), lin("gate", None), lin("up", None), lin("down", None),
                            cpu(norms["attn"]), cpu(norms["ffn"]))
