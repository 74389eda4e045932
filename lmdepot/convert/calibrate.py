"""`lite calibrate`: per-layer activation statistics, stored as one zarr v3 group.

Layout of `WORK_DIR/stats.zarr` (float32 arrays, one chunk per layer):
  {attn_in,o_in,ffn_in,down_in}/{max,min,mean,absmax,absmean}   (layers, in_features)
      inputs of q/k/v, o, gate/up and down: per input channel over all calibration tokens
  {key,value}/{max,min,absmax}                                   (layers, kv_heads, head_dim)
      post-RoPE keys and the values, per kv head and channel
Attributes: the model's shape (num_layer, head_num, kv_head_num, size_per_head, hidden_units,
inter_size), the source and its digest, the calibration parameters and the text's sha256.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmdepot import __version__
from lmdepot.convert.calib_data import CalibParams, CalibrationError, calibration_tokens, encoder_for
from lmdepot.convert.calib_model import LayerRunner
from lmdepot.formats.config import WorkspaceConfig

STATS_DIR = "stats.zarr"
INPUTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "ffn_in": "mlp.gate_proj",
          "down_in": "mlp.down_proj"}
INPUT_STATS = ("max", "min", "mean", "absmax", "absmean")
KV_STATS = ("max", "min", "absmax")
SHAPE_KEYS = ("num_layer", "head_num", "kv_head_num", "size_per_head", "hidden_units", "inter_size")


class _Channels:
    """Running per-channel statistics over the leading dims; sums in float64."""

    def __init__(self):
        self.max = self.min = self.sum = self.abssum = self.absmax = None
        self.count = 0

    def update(self, x: torch.Tensor, dims: tuple[int, ...]):
        x = x.detach()
        mx, mn, ab = x.amax(dims), x.amin(dims), x.abs()
        s, abs_s, amax = x.double().sum(dims), ab.double().sum(dims), ab.amax(dims)
        self.count += x.numel() // mx.numel()
        if self.max is None:
            self.max, self.min, self.sum, self.abssum, self.absmax = mx, mn, s, abs_s, amax
        else:
            self.max, self.min = torch.maximum(self.max, mx), torch.minimum(self.min, mn)
            self.sum, self.abssum, self.absmax = self.sum + s, self.abssum + abs_s, torch.maximum(self.absmax, amax)

    def result(self, names) -> dict[str, np.ndarray]:
        values = {"max": self.max, "min": self.min, "absmax": self.absmax,
                  "mean": self.sum / self.count, "absmean": self.abssum / self.count}
        return {n: values[n].float().cpu().numpy() for n in names}


class StatsCollector:
    """Hooks a decoder layer module; accumulates input and KV statistics of one layer."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.inputs = {name: _Channels() for name in INPUTS}
        self.key, self.value = _Channels(), _Channels()

    def kv_sink(self, key: torch.Tensor, value: torch.Tensor):
        self.key.update(key, (0, 2))  # (batch, kv_heads, T, d) -> (kv_heads, d)
        self.value.update(value, (0, 2))

    @contextlib.contextmanager
    def hooked(self, mod):
        handles = []
        for name, path in INPUTS.items():
            acc = self.inputs[name]
            handles.append(mod.get_submodule(path).register_forward_pre_hook(
                lambda m, args, acc=acc: acc.update(args[0], tuple(range(args[0].dim() - 1)))))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def result(self) -> dict[str, np.ndarray]:
        out = {f"{n}/{s}": v for n, acc in self.inputs.items() for s, v in acc.result(INPUT_STATS).items()}
        out |= {f"key/{s}": v for s, v in self.key.result(KV_STATS).items()}
        out |= {f"value/{s}": v for s, v in self.value.result(KV_STATS).items()}
        return out


def _shapes(cfg: WorkspaceConfig) -> dict[str, tuple[int, ...]]:
    width = {"attn_in": cfg.hidden_units, "o_in": cfg.head_num * cfg.size_per_head,
             "ffn_in": cfg.hidden_units, "down_in": cfg.inter_size}
    shapes = {f"{n}/{s}": (cfg.num_layer, w) for n, w in width.items() for s in INPUT_STATS}
    kv = (cfg.num_layer, cfg.kv_head_num, cfg.size_per_head)
    return shapes | {f"{t}/{s}": kv for t in ("key", "value") for s in KV_STATS}


class StatsWriter:
    def __init__(self, work_dir: str | Path, cfg: WorkspaceConfig, attrs: dict):
        import zarr

        path = Path(work_dir) / STATS_DIR
        path.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.group.attrs.update(attrs | {k: getattr(cfg, k) for k in SHAPE_KEYS} | {"complete": False})
        self.arrays = {name: self.group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="float32",
                                                     fill_value=np.nan)
                       for name, shape in _shapes(cfg).items()}

    def write(self, layer: int, stats: dict[str, np.ndarray]):
        for name, value in stats.items():
            self.arrays[name][layer] = value

    def close(self):
        self.group.attrs["complete"] = True


class CalibStats:
    """A calibration directory read back."""

    def __init__(self, work_dir: str | Path):
        import zarr

        path = Path(work_dir)
        path = path if path.name == STATS_DIR else path / STATS_DIR
        if not (path / "zarr.json").is_file():
            raise CalibrationError(f"{work_dir}: no {STATS_DIR}; run `lmdepot lite calibrate` first")
        self.group = zarr.open_group(str(path), mode="r")
        self.attrs = dict(self.group.attrs)
        if not self.attrs.get("complete"):
            raise CalibrationError(f"{work_dir}: calibration did not finish; run `lmdepot lite calibrate` again")

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    def check_model(self, cfg: WorkspaceConfig, what: str = "the model"):
        for key in SHAPE_KEYS:
            if int(self.attrs.get(key, -1)) != getattr(cfg, key):
                raise CalibrationError(f"calibration data is for a model with {key} = {self.attrs.get(key)},"
                                       f" but {what} has {key} = {getattr(cfg, key)}")


def calib_attrs(src, params: CalibParams, digest: str, samples: int) -> dict:
    return {"lmdepot_version": __version__, "source": {"name": src.name, "sha256": src.digest},
            "calib": params.describe() | {"samples": samples, "text_sha256": digest}}


def load_tokens(src, params: CalibParams) -> tuple[torch.Tensor, str]:
    return calibration_tokens(encoder_for(src.hf_dir), params)


def calibrate(model: str, work_dir: str | Path, params: CalibParams, device=None) -> Path:
    from lmdepot.convert.converter import ConvertOptions, build_config
    from lmdepot.convert.source import open_source

    src = open_source(model)
    cfg = build_config(src, ConvertOptions())
    tokens, digest = load_tokens(src, params)
    runner = LayerRunner(src, cfg, device)
    writer = StatsWriter(work_dir, cfg, calib_attrs(src, params, digest, tokens.shape[0]))
    collector = StatsCollector()
    hidden = runner.embed(tokens)
    for i in tqdm(range(cfg.num_layer), desc=f"calibrating {src.name}", unit="layer"):
        mod = runner.module(runner.layer_tensors(i))
        collector.reset()
        with collector.hooked(mod):
            hidden = runner.forward(mod, hidden, kv_sink=collector.kv_sink)
        writer.write(i, collector.result())
        del mod
    writer.close()
    return Path(work_dir) / STATS_DIR
