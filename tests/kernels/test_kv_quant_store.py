"""Quantized KV store kernels (per-token int8/int4, per-channel int4 keys) vs the torch reference
(ops/kv_quant.store_kv_quant): the same codes and params, byte for byte."""

import pytest
import torch

from lmdepot.runtime.kernels.kv_store_channel import store_keys_channel
from lmdepot.runtime.kernels.kv_store_quant import store_quant_per_token
from lmdepot.runtime.kv_cache import allocate, make_spec
from lmdepot.runtime.ops.kv_quant import store_kv_quant, unpack_int4
from tests.kernels.conftest import DEVICE


def _keys(t, hkv, d):
    k = torch.randn(t, hkv, d, device=DEVICE)
    k[:, :, 1] = k[:, :, 1] * 6 + 9    # an outlier channel with an offset
    return k


@pytest.mark.parametrize("bits, rotate", [(8, False), (4, False), (4, True)])
def test_per_token_store_matches_reference(bits, rotate):
    hkv, d = 3, 32
    spec = make_spec(bits, torch.float32, d, scheme="rotate" if rotate else "plain")
    ref, got = (allocate(spec, 5, 8, hkv, d, device=DEVICE) for _ in range(2))
    x = _keys(13, hkv, d)
    slots = torch.randperm(40, device=DEVICE)[:13]
    store_kv_quant(x, x, ref, slots)
    store_quant_per_token(x, slots, got.codes[1], got.scales[1], got.zeros[1], bits, rotate)
    s = slots.long()
    flat = lambda t: t.view(-1, *t.shape[2:])[s]   # noqa: E731
    assert torch.equal(flat(got.scales[1]), flat(ref.scales[1]))
    assert torch.equal(flat(got.zeros[1]), flat(ref.zeros[1]))
    want, have = flat(ref.codes[1]), flat(got.codes[1])
    if bits == 4:
        want, have = unpack_int4(want), unpack_int4(have)
    assert torch.equal(have, want)   # the rotation is the reference's own float32 product


def _step(hkv, d, page, tables, done, new):
    """Keys, slots and the step's device tensors for sequences with `done` cached and `new` tokens."""
    k = _keys(sum(new), hkv, d)
    slots = torch.cat([tables[i].long().cpu()[(torch.arange(done[i], done[i] + n) // page)] * page
                       + torch.arange(done[i], done[i] + n) % page for i, n in enumerate(new)]).to(DEVICE)
    lens = torch.tensor([c + n for c, n in zip(done, new)], dtype=torch.int32, device=DEVICE)
    qloc = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    return k, slots, lens, qloc


@pytest.mark.parametrize("d, page, scale", [(32, 8, 1), (128, 64, 8)])
def test_channel_key_store_matches_reference_over_steps(d, page, scale):
    """A prefill split mid-block, then decode steps (the last block's ranges re-derived each time),
    for two sequences at once: the kernel's cache equals the reference's after every step (the
    second case: the real head and page, 2 warps, blocks of 64 rows walked 8 at a time)."""
    hkv = 2
    spec = make_spec(4, torch.float32, d)
    assert spec.key_channel
    ref, got = (allocate(spec, 12, page, hkv, d, device=DEVICE) for _ in range(2))
    for c in (ref, got):   # the same starting state, garbage included
        c.key_scale.fill_(0.5), c.key_min.fill_(-1.0), c.key_sink.zero_(), c.codes[0].fill_(0xA5)
    tables = torch.tensor([[3, 7, 1, 9], [0, 11, 5, 2]], dtype=torch.int32, device=DEVICE)
    done = [0, 0]
    for new in ([11 * scale, 3 * scale], [1, 1], [6 * scale, 9 * scale], [1, 1], [1, 1]):
        k, slots, lens, qloc = _step(hkv, d, page, tables, done, new)
        store_kv_quant(k, k, ref, slots)
        store_keys_channel(k, got, tables, lens, qloc, max(new))
        done = [c + n for c, n in zip(done, new)]
        for name in ("key_scale", "key_min", "key_sink"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert torch.equal(got.codes[0], ref.codes[0])
