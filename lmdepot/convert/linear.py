"""A linear layer's weights in workspace orientation (in_features, out_features), plain or int4.

Tensor-parallel splitting works on this logical form, so fp16 and int4 weights split the same way
and packing happens only when a rank's slice is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdepot.formats.int4 import pack_int4

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Linear:
    weight: torch.Tensor | None = None   # (in, out) float, for plain weights
    q: torch.Tensor | None = None        # (in_padded, out) uint8 codes in [0, 15], for int4
    scales: torch.Tensor | None = None   # (groups, out)
    zeros: torch.Tensor | None = None    # (groups, out)
    bias: torch.Tensor | None = None     # (out,)

    @property
    def quantized(self) -> bool:
        return self.q is not None

    @property
    def group_size(self) -> int:
        return self.q.shape[0] // self.scales.shape[0]

    def columns(self, start: int, end: int) -> "Linear":
        pick = (lambda t: None if t is None else t[..., start:end])
        return Linear(pick(self.weight), pick(self.q), pick(self.scales), pick(self.zeros), pick(self.bias))

    def rows(self, start: int, end: int) -> "Linear":
        """Input rows [start, end); for int4 both must fall on group boundaries."""
        if not self.quantized:
            return Linear(self.weight[start:end], bias=self.bias)
        g = self.group_size
        return Linear(q=self.q[start:end], scales=self.scales[start // g:end // g],
                      zeros=self.zeros[start // g:end // g], bias=self.bias)

    @staticmethod
    def cat_columns(parts: list["Linear"]) -> "Linear":
        def cat(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim=-1)
        return Linear(cat("weight"), cat("q"), cat("scales"), cat("zeros"), cat("bias"))

    def tensors(self, prefix: str, dtype: str) -> dict[str, torch.Tensor]:
        """Workspace tensors of this linear under `prefix` (e.g. 'attention.w_qkv')."""
        torch_dtype = TORCH_DTYPES[dtype]
        out = {}
        if self.quantized:
            out[f"{prefix}.qweight"] = pack_int4(self.q)
            out[f"{prefix}.scales"] = self.scales.to(torch.float16)
            out[f"{prefix}.zeros"] = self.zeros.to(torch.float16)
        else:
            out[f"{prefix}.weight"] = self.weight.to(torch_dtype)
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.to(torch_dtype)
        return out
