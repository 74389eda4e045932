"""Reading and writing safetensors files without mmap, one tensor at a time.

Reading through plain seeks keeps resident memory at the tensors actually requested (mmap'd
pages of a multi-GB checkpoint would otherwise stay in RSS), and the same header parser serves
ranged reads from remote fsspec files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmdepot.errors import FormatError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


def read_header(f, source: str) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data section)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise FormatError(f"{source}: truncated safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
        raise FormatError(f"{source}: safetensors header of {n} bytes is not plausible")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{source}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """Lazy tensor access to one safetensors file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self.header, self.data_start = read_header(f, self.path)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise FormatError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise FormatError(f"{self.path}: truncated data for tensor {name}")
        dtype = DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Deterministic write: same tensors give the same bytes."""
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, str(path),
              metadata={"format": "pt"})


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}
