"""Quantized KV cache: writes and reads against a float64 reference, static scales, capacity."""


import pytest
import torch

from lmdepot.formats.config import WorkspaceConfig
from lmdepot.runtime.kv_cache import KVSpec, allocate, kv_block_bytes, make_spec
from lmdepot.runtime.ops import kv_quant
from lmdepot.runtime.ops.kv_quant import gather_kv_quant, hadamard, store_kv_quant


def ref_online(x: torch.Tensor, bits: int, group: int, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 quantize -> dequantize of the documented online scheme, in the rotated channel basis
    when `rotate` (the read path rotates back); also returns each element's step."""
    x = x.double()
    t, h, d = x.shape
    if rotate:
        x = x @ hadamard(d).double()
    qmax = 2 ** bits - 1
    g = x.reshape(t, h, d // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=kv_quant.SCALE_FLOOR).half().double()[..., None]
    zero = torch.round(-lo[..., None] / scale).clamp(0, qmax)
    q = (torch.round(g / scale) + zero).clamp(0, qmax)
    return ((q - zero) * scale).reshape(t, h, d), scale.expand_as(g).reshape(t, h, d)


def kv_batch(t=40, h=3, d=64):
    k = torch.randn(t, h, d)
    k[:, :, 5] *= 20   # an outlier channel, like real keys after RoPE
    v = torch.randn(t, h, d) * 0.5 + 0.1
    return k, v


@pytest.mark.parametrize("bits,group,rotate", [(8, 64, False), (4, 64, False), (4, 64, True), (4, 16, False),
                                               (8, 32, True)])
def test_cache_write_read_matches_float64(bits, group, rotate):
    k, v = kv_batch()
    spec = KVSpec(bits, torch.float32, group, rotate)
    cache = allocate(spec, num_blocks=6, block_size=16, hkv=3, head_dim=64)
    slots = torch.randperm(96)[:40]
    store_kv_quant(k, v, cache, slots)
    width = 64 if bits == 8 else 32
    assert cache.codes[0].shape == (6, 16, 3, width) and cache.codes[0].dtype == torch.uint8
    assert cache.scales[0].shape == (6, 16, 3, 64 // group) and cache.scales[0].dtype == torch.float16
    got_k, got_v = gather_kv_quant(cache, slots, torch.float32)
    for x, got in ((k, got_k), (v, got_v)):
        want, step = ref_online(x, bits, group, rotate)
        if rotate:   # compare codes in the basis they were taken in
            got, x = got.double() @ hadamard(64).double(), x.double() @ hadamard(64).double()
        # float32 vs float64 rounding may flip a code on an exact tie: allow one step there, rarely
        diff = (got.double() - want).abs()
        assert (diff <= step + 1e-5).all()
        assert (diff > 1e-4 * step + 1e-6).float().mean() < 1e-3
        # the quantizer's own bound: half a step inside the range, one step at its ends, where the
        # integer zero point may shift the grid by half a step
        err = (got.double() - x.double()).abs() / step
        assert (err <= 1 + 1e-3).all() and err.mean() < 0.3
    rel = (got_k.double() - k.double()).norm() / k.norm()
    assert rel < (0.01 if bits == 8 else 0.2)


def ref_channel_block(rows: torch.Tensor) -> torch.Tensor:
    """float64 quantize -> dequantize of one block's keys in the channel scheme: row 0 exact (fp16),
    rows 1.. per (head, channel) with an fp16 minimum and fp16 scale over those rows."""
    out = rows.double().clone()
    out[0] = rows[0].half().double()
    if rows.shape[0] > 1:
        x = rows[1:].double()
        lo = x.amin(0).half().double()
        scale = ((x.amax(0) - lo) / 15).clamp(min=kv_quant.SCALE_FLOOR).half().double()
        out[1:] = torch.round((x - lo) / scale).clamp(0, 15) * scale + lo
    return out


def test_channel_keys_written_in_appends_match_float64():
    """Keys per channel over each block, the block's first key exact; a block filled by a prefill
    chunk and then decode steps has its ranges re-derived from what the cache holds plus the new
    keys (float64 replay of the same steps); blocks not written keep their bytes (prefix sharing)."""
    torch.manual_seed(0)
    bs, h, d = 8, 2, 64
    spec = make_spec(4, torch.float32, d)
    assert (spec.key_channel, spec.rotate) == (True, True)
    cache = allocate(spec, 4, bs, h, d)
    assert cache.key_scale.shape == cache.key_min.shape == cache.key_sink.shape == (4, h, d)
    assert cache.scales[0] is None and cache.scales[1].shape == (4, bs, h, 1)   # V stays per token
    k, v = kv_batch(t=13, h=h, d=d)
    k[0] *= 30   # an attention-sink-like first token: exact, so it does not set block 0's ranges
    table = torch.tensor([2, 0])
    slots = table[torch.arange(13) // bs] * bs + torch.arange(13) % bs
    want = torch.zeros(13, h, d, dtype=torch.float64)
    done = 0
    for n in (5, 1, 4, 1, 2):   # across the block boundary at 8
        store_kv_quant(k[done:done + n], v[done:done + n], cache, slots[done:done + n])
        for b in range(done // bs, (done + n - 1) // bs + 1):
            lo, hi = b * bs, min((b + 1) * bs, done + n)
            rows = torch.cat([want[lo:done], k[max(lo, done):hi].double()]) if done > lo else k[lo:hi]
            want[lo:hi] = ref_channel_block(rows)
        done += n
        got_k, _ = gather_kv_quant(cache, slots[:done], torch.float32)
        assert torch.allclose(got_k.double(), want[:done], rtol=0, atol=1e-5)
    assert torch.equal(got_k[0], k[0].half().float()) and torch.equal(got_k[8], k[8].half().float())
    # one range per channel: block 0's outlier channel 5 does not coarsen the other channels
    err = (got_k[1:8] - k[1:8]).abs()
    assert err[..., 5].mean() > 3 * err[..., :5].mean()
    full = [t[2].clone() for t in (cache.codes[0], cache.key_scale, cache.key_min, cache.key_sink)]
    store_kv_quant(k[:1], v[:1], cache, torch.tensor([0 * bs + 5]))   # the next token of the last block
    assert all(torch.equal(a, b[2]) for a, b in zip(full, (cache.codes[0], cache.key_scale, cache.key_min,
                                                           cache.key_sink)))


def test_channel_scheme_options():
    from lmdepot.runtime.errors import RuntimeLoadError

    assert make_spec(4, torch.float16, 64, scheme="rotate") == KVSpec(4, torch.float16, 64, True)
    assert make_spec(4, torch.float16, 64, scheme="plain") == KVSpec(4, torch.float16, 64, False)
    assert make_spec(8, torch.float16, 64) == KVSpec(8, torch.float16, 64, False)
    for args, msg in (((8, "online", "channel"), "--kv-scheme channel is an int4 scheme (--quant-policy 4)"),
                      ((0, "online", "plain"), "--kv-scheme needs --quant-policy 8 or 4 with online scales"),
                      ((4, "static", "plain"), "--kv-scheme needs --quant-policy 8 or 4 with online scales"),
                      ((4, "online", "kivi"), "--kv-scheme kivi: must be one of plain, rotate, channel")):
        with pytest.raises(RuntimeLoadError) as exc:
            make_spec(args[0], torch.float16, 64, args[1], scheme=args[2])
        assert str(exc.value) == msg


def test_int4_packs_two_codes_per_byte():
    k, v = kv_batch(t=4)
    cache = allocate(KVSpec(4, torch.float32, 64, False), 1, 4, 3, 64)
    store_kv_quant(k, v, cache, torch.arange(4))
    s = cache.scales[0].float().view(4, 3, 1)
    z = cache.zeros[0].float().view(4, 3, 1)
    codes = (torch.round(k / s) + z).clamp(0, 15).to(torch.uint8)
    packed = cache.codes[0].view(4, 3, 32)
    assert torch.equal(packed & 0xF, codes[..., 0::2]) and torch.equal(packed >> 4, codes[..., 1::2])


def test_hadamard_is_orthonormal_and_symmetric():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.t())


def test_static_scales_quantize_per_head():
    k, v = kv_batch(t=10)
    scale = torch.tensor([0.02, 0.05, 0.1])
    zero = torch.tensor([128.0, 100.0, 127.5])
    cache = allocate(KVSpec(8, torch.float32, 64, False, True), 2, 8, 3, 64,
                     static_params=[(scale, zero), (scale * 0.5, zero)])
    assert cache.scales == [] and cache.zeros == []   # no per-token parameters
    store_kv_quant(k, v, cache, torch.arange(10))
    got_k, _ = gather_kv_quant(cache, torch.arange(10), torch.float32)
    s, z = scale.double()[:, None], zero.double()[:, None]
    want = (torch.round(k.double() / s + z).clamp(0, 255) - z) * s
    assert torch.allclose(got_k.double(), want, atol=1e-6)


def smol_cfg(**over) -> WorkspaceConfig:
    cfg = WorkspaceConfig(model_name="smol", model_arch="LlamaForCausalLM", head_num=9, kv_head_num=3,
                          size_per_head=64, hidden_units=576, vocab_size=49152, num_layer=30, inter_size=1536)
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("head_dim", [64, 128])
def test_capacity_int8_and_int4_against_fp16(head_dim):
    cfg = smol_cfg(size_per_head=head_dim)
    budget = 1 << 30
    fp16 = budget // kv_block_bytes(cfg, 64, make_spec(0, torch.float16, head_dim))
    int8 = budget // kv_block_bytes(cfg, 64, make_spec(8, torch.float16, head_dim))
    int4 = budget // kv_block_bytes(cfg, 64, make_spec(4, torch.float16, head_dim))
    rot4 = budget // kv_block_bytes(cfg, 64, make_spec(4, torch.float16, head_dim, scheme="rotate"))
    static4 = budget // kv_block_bytes(cfg, 64, make_spec(4, torch.float16, head_dim, "static"))
    # head_dim 64: 128 B fp16 per head and token; int8 64 + 3 (fp16 scale, uint8 zero); rotated int4
    # 32 + 3; channel int4 (the default): K 32 + 6 * 64 / 64 (fp16 scale, min, sink per block and
    # channel), V 32 + 3
    assert int8 / fp16 >= 1.9 and int4 / fp16 >= 3.5 and rot4 / fp16 >= 3.6 and static4 / fp16 >= 3.99
    d = head_dim
    assert int4 / fp16 == pytest.approx(4 * d / (d + 6 * d / 64 + 3), rel=1e-3)
    if head_dim == 64:
        assert (round(int8 / fp16, 2), round(rot4 / fp16, 2), round(int4 / fp16, 2)) == (1.91, 3.66, 3.51)


def test_runner_blocks_in_same_budget(tiny):
    from lmdepot.runtime.engine import Engine
    from lmdepot.runtime.config import EngineConfig

    _, ws = tiny("llama")
    blocks = {}
    for qp in (0, 8, 4):
        eng = Engine(ws, EngineConfig(quant_policy=qp, dtype="fp16", cpu_memory_budget=64 << 20,
                                      cache_max_entry_count=0.5, quiet=True, kv_group_size=16, kv_rotate=False))
        r = eng.runner
        blocks[qp] = r.num_blocks
        assert r.num_blocks == int(((64 << 20) - r.weight_bytes) * 0.5) // r.block_bytes
        assert r.block_bytes == kv_block_bytes(eng.cfg, r.block_size, r.kv_spec)
        eng.close()
    # tiny head_dim 16: 32 B fp16 vs 16 + 3 (int8) per head and token for K and for V; int4 channel:
    # K 8 + 6 * 16 / B, V 8 + 3
    assert blocks[8] / blocks[0] == pytest.approx(32 / 19, rel=1e-3)
    assert blocks[4] / blocks[0] == pytest.approx(64 / (8 + 96 / r.block_size + 8 + 3), rel=1e-3)


@pytest.mark.parametrize("policy", [8, 4])
def test_generate_cli_with_quantized_cache(tiny, policy):
    from click.testing import CliRunner

    from lmdepot.cli import main

    _, ws = tiny("llama")
    r = CliRunner().invoke(main, ["generate", str(ws), "--prompt", "w5 w6 w7", "--no-chat-template",
                                  "--temperature", "0", "--max-new-tokens", "6", "--quant-policy", str(policy),
                                  "--cache-max-entry-count", "0.01"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"int{policy} KV cache" in r.stderr and len(r.stdout.split()) >= 1


def test_int4_channel_cache_same_tokens_alone_and_batched(tiny):
    """The per-channel key cache under continuous batching and prefix caching: a sequence's blocks
    see the same writes alone as beside others (prompts fit one step, then one token per step), so
    greedy tokens match; shared prefix blocks are full, hence never requantized."""
    from lmdepot.runtime.llm import LLM
    from lmdepot.runtime.sequence import SamplingParams

    _, ws = tiny("llama")
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 160, (32,), generator=g).tolist()   # 2 full blocks of 16
    prompts = [shared + torch.randint(3, 160, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, quant_policy=4, quiet=True)
    alone = LLM(ws, max_batch_size=1, enable_prefix_caching=False, **kw)
    try:
        assert alone.engine.runner.kv_spec.key_channel
        expected = [alone.generate(p, greedy).token_ids for p in prompts]
    finally:
        alone.close()
    llm = LLM(ws, max_batch_size=4, **kw)
    try:
        first = llm.generate(prompts[0], greedy).token_ids
        outs = llm.generate(prompts[1:], greedy)
        assert llm.engine.bm.hits >= 2 * 3
        assert [first] + [o.token_ids for o in outs] == expected
    finally:
        llm.close()
