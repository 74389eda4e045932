"""Workspace (or registry ref) -> verified config + this rank's tensors, nothing of other ranks."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmdepot.errors import FormatError, LmdepotError
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import SafetensorsFile
from lmdepot.runtime.errors import RuntimeLoadError

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9._-]+|@sha256:[0-9a-f]{64})$")


def is_ref(source: str) -> bool:
    return bool(_REF.match(source)) and not Path(source).exists()


def resolve_workspace(source: str | Path, rank: int = 0) -> Path:
    """A local workspace dir, or a registry ref pulled for `rank` only."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise RuntimeLoadError(f"{source}: not a workspace directory")
    if not is_ref(str(source)):
        raise RuntimeLoadError(f"{source}: no such workspace directory, and not a registry ref"
                               " (NAME:TAG or NAME@sha256:HEX)")
    from lmdepot.registry import Registry  # lazy: plain workspace loads need no fsspec
    from lmdepot.registry.pull import pull

    registry = Registry()  # $LMDEPOT_REGISTRY, else the default store in the user cache
    try:
        result = pull(registry, str(source), rank=rank)
    except LmdepotError:
        raise
    except (FileNotFoundError, KeyError) as exc:
        raise RuntimeLoadError(f"{source}: not found in the registry ({exc})") from None
    # One line per rank, so that every node's log shows what it transferred (rank's files only).
    print(pull_summary(source, rank, result), file=sys.stderr, flush=True)
    return Path(result.path)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def pull_summary(source, rank: int, result) -> str:
    """One line: the rank's files fetched from the registry and found in the cache, with their bytes."""
    fetched = sum(b.size for b in result.fetched)
    cached = sum(b.size for b in result.cached)
    return (f"[lmdepot] rank {rank} pulled {source} ({result.digest[:19]}): {len(result.fetched)} files fetched"
            f" ({fetched} bytes, {_size(fetched)}), {len(result.cached)} already cached ({cached} bytes)"
            f" -> {result.path}")


@dataclass
class RankWeights:
    cfg: WorkspaceConfig
    workspace: Path
    rank: int
    layers: list[dict[str, torch.Tensor]]
    globals: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> None:
        if device.type != "cpu":
            self.layers = [{k: v.to(device) for k, v in t.items()} for t in self.layers]
            self.globals = {k: v.to(device) for k, v in self.globals.items()}

    @property
    def nbytes(self) -> int:
        ts = [t for d in self.layers for t in d.values()] + list(self.globals.values())
        return sum(t.numel() * t.element_size() for t in ts)


def read_config(workspace: Path, tp: int | None = None) -> WorkspaceConfig:
    cfg = WorkspaceConfig.read(workspace / layout.CONFIG_FILE)
    if tp is not None and tp != cfg.tensor_para_size:
        raise RuntimeLoadError(f"--tp {tp} differs from the workspace's tensor_para_size = {cfg.tensor_para_size};"
                               f" use --tp {cfg.tensor_para_size} or re-convert with --tp {tp}")
    return cfg


def expected_shapes(cfg: WorkspaceConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Shapes config.ini implies for one rank: (layer tensors, global tensors); int4 linears by qweight."""
    tp, d, h = cfg.tensor_para_size, cfg.size_per_head, cfg.hidden_units
    hq, hkv = cfg.heads_of_rank()
    inter = cfg.inter_size // tp
    linears = {layout.W_QKV: (h, (hq + 2 * hkv) * d), layout.W_O: (hq * d, h),
               layout.W_GATE: (h, inter), layout.W_UP: (h, inter), layout.W_DOWN: (inter, h)}
    layer: dict[str, tuple] = {layout.ATTN_NORM: (h,), layout.FFN_NORM: (h,)}
    for name, (fan_in, fan_out) in linears.items():
        if cfg.weight_type == "int4":
            groups = -(-fan_in // cfg.group_size)
            layer |= {f"{name}.qweight": (groups * cfg.group_size // 8, fan_out),
                      f"{name}.scales": (groups, fan_out), f"{name}.zeros": (groups, fan_out)}
        elif cfg.weight_type == "int8":
            layer |= {f"{name}.qweight": (fan_in, fan_out), f"{name}.scales": (fan_out,)}
        else:
            layer[f"{name}.weight"] = (fan_in, fan_out)
    vocab = cfg.padded_vocab() // tp
    glob = {layout.TOK_EMBEDDINGS: (vocab, h), layout.FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        glob[layout.LM_HEAD] = (vocab, h)
    return layer, glob


def _read_checked(path: Path, want: dict[str, tuple], optional: dict[str, tuple]) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    keys = set(f.keys())
    missing = [k for k in want if k not in keys]
    if missing:
        raise FormatError(f"{path}: missing tensor {missing[0]} (config.ini expects it)")
    out = {}
    for name, shape in {**want, **{k: v for k, v in optional.items() if k in keys}}.items():
        if tuple(f.shape(name)) != shape:
            raise FormatError(f"{path}: tensor {name} has shape {tuple(f.shape(name))} but config.ini implies"
                              f" {shape}; config.ini is inconsistent with the weights")
        out[name] = f.get(name)
    return out


def load_rank(source: str | Path, rank: int = 0, tp: int | None = None, verify: bool = True) -> RankWeights:
    workspace = resolve_workspace(source, rank)
    manifest = Manifest.read(workspace)
    cfg = read_config(workspace, tp)
    entries = manifest.for_rank(rank)
    listed = {e.path for e in entries}
    needed = [layout.global_file(rank)] + [layout.layer_file(i, rank) for i in range(cfg.num_layer)]
    for p in needed + [layout.CONFIG_FILE]:
        if p not in listed:
            raise FormatError(f"{workspace / p}: not listed in the manifest")
    if verify:
        manifest.verify(workspace, entries)
    else:  # still refuse absent files with their name rather than a traceback later
        for p in needed:
            if not (workspace / p).is_file():
                raise FormatError(f"{workspace / p}: missing (listed in the manifest)")
    layer_shapes, global_shapes = expected_shapes(cfg)
    d, h = cfg.size_per_head, cfg.hidden_units
    hq, hkv = cfg.heads_of_rank()
    optional = {f"{layout.W_QKV}.bias": ((hq + 2 * hkv) * d,), f"{layout.W_O}.bias": (h,)}
    if cfg.attn_bias:
        layer_shapes = layer_shapes | {f"{layout.W_QKV}.bias": ((hq + 2 * hkv) * d,)}
    layers = [_read_checked(workspace / layout.layer_file(i, rank), layer_shapes, optional)
              for i in range(cfg.num_layer)]
    glob = _read_checked(workspace / layout.global_file(rank), global_shapes, {})
    return RankWeights(cfg, workspace, rank, layers, glob)
