"""Group quantization against a float64 reference, padding per rank slice, and the written files."""

from __future__ import annotations

import pytest
import torch

from lmdepot.convert.linear import Linear
from lmdepot.convert.quant_groups import fake_quantize, quantize, quantize_linear
from lmdepot.formats.int4 import dequantize_int4, pack_int4, unpack_int4


def reference(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64, one group at a time, straight from the rule in docs/format.md: dequantized weights
    and the distance of w / scale + zero from a rounding tie."""
    w = w.double()
    out, tie = torch.empty_like(w), torch.empty_like(w)
    for start in range(0, w.shape[0], g):
        grp = w[start:start + g]
        hi, lo = grp.amax(0).clamp(min=0), grp.amin(0).clamp(max=0)
        scale = ((hi - lo) / 15).half().double()
        zero = torch.round(-lo / scale).clamp(0, 15)
        code = grp / scale + zero
        q = torch.round(code).clamp(0, 15)
        out[start:start + g] = (q - zero) * scale
        tie[start:start + g] = ((code - code.floor()) - 0.5).abs()
    return out, tie


@pytest.mark.parametrize("rows,g", [(128, 32), (192, 64), (576, 128), (72, 32)])
def test_round_trip_matches_float64_reference(rows, g):
    w = torch.randn(rows, 48) * torch.rand(rows, 1) * 0.1
    deq = fake_quantize(w, g)
    ref, tie = reference(w, g)
    q, scales, zeros = quantize(w, g)
    step = scales.double().repeat_interleave(g, 0)[:rows]
    diff = (deq.double() - ref).abs()
    # float32 arithmetic may round the other way only at a tie, and then by exactly one step.
    off = diff > 1e-6
    assert off.sum() <= 2 and (tie[off] < 1e-5).all()
    torch.testing.assert_close(diff[off], step[off], rtol=1e-5, atol=0)
    assert q.shape == (-(-rows // g) * g, 48) and scales.shape == (-(-rows // g), 48)
    # Within half a step, give or take the fp16 rounding of the scale at the range's ends.
    assert ((w - deq).abs() <= step * 0.51).all()
    # The packed file form dequantizes to the same values.
    packed = dequantize_int4(pack_int4(q), scales.half(), zeros.half(), rows)
    torch.testing.assert_close(packed, deq, rtol=0, atol=1e-6)


def test_padding_rows_quantize_to_the_zero_point():
    w = torch.randn(72, 16) + 3.0  # all positive: zero = 0 only because 0 is kept in the range
    q, scales, zeros = quantize(w, 32)
    assert torch.equal(q[72:], zeros[-1:].expand(24, 16).to(torch.uint8))


def test_row_parallel_parts_are_padded_separately():
    """SmolLM2 wo with tp=3: 576 rows = 3 slices of 192 = 1.5 groups of 128 each."""
    w = torch.randn(576, 40)
    q, scales, zeros = quantize(w, 128, parts=3)
    assert q.shape == (3 * 256, 40) and scales.shape == (6, 40)
    for r in range(3):
        qs, ss, zs = quantize(w[r * 192:(r + 1) * 192], 128)
        assert torch.equal(q[r * 256:(r + 1) * 256], qs) and torch.equal(scales[r * 2:(r + 1) * 2], ss)
    torch.testing.assert_close(fake_quantize(w, 128, parts=3)[192:384], fake_quantize(w[192:384], 128))
    # Grouping across the rank boundary would give different values.
    assert not torch.equal(fake_quantize(w, 128, parts=3), fake_quantize(w, 128))


def test_quantize_linear_packs_in_plain_nibble_order():
    w = torch.randn(64, 8)
    lin = quantize_linear(Linear(w, bias=torch.ones(8)), 32)
    t = lin.tensors("attention.wo", "fp16")
    assert set(t) == {"attention.wo.qweight", "attention.wo.scales", "attention.wo.zeros", "attention.wo.bias"}
    assert torch.equal(unpack_int4(t["attention.wo.qweight"]), lin.q)
    nib = (t["attention.wo.qweight"][0, 0].item() >> 4) & 0xF  # nibble 1 of row 0 = input row 1
    assert nib == lin.q[1, 0].item()
