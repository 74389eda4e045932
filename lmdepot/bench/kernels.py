"""`lmdepot bench kernels`: kernel times against cuBLAS, torch's int4 / int8 matmuls, torch SDPA (flash)
and the memory roofline.

Every figure is printed beside the device-to-device copy bandwidth measured in the same run;
roofline % = (bytes the case must move / copy bandwidth) / measured time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from lmdepot.bench.shapes import linear_shapes


@dataclass
class Row:
    case: str
    impl: str
    us: float
    bytes: int
    roofline_pct: float
    note: str = ""


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def _time_us(fn) -> float:
    """GPU time of fn replayed from a CUDA graph, as the engine runs decode steps (no launch overhead)."""
    from triton.testing import do_bench_cudagraph

    fn()
    return do_bench_cudagraph(fn, rep=100) * 1e3


def _torch_int4(x, w_codes_kn, scales, zeros, group):
    """torch's tinygemm int4 path, if this torch build provides it for the device; else None."""
    try:
        K, N = w_codes_kn.shape
        codes_nk = w_codes_kn.t().contiguous().to(torch.int32)
        packed_u8 = (codes_nk[:, ::2] << 4 | codes_nk[:, 1::2]).to(torch.uint8)
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        # tinygemm computes (q - 8) * scale + zero_bf16; convert our (q - z) * s form.
        s = scales.to(torch.bfloat16)
        zb = ((8 - zeros.float()) * scales.float()).to(torch.bfloat16)
        sz = torch.stack([s, zb], dim=-1).contiguous()
        xb = x.to(torch.bfloat16)
        fn = (lambda: torch.ops.aten._weight_int4pack_mm(xb, wp, group, sz))
        ref = x.float() @ ((w_codes_kn.float() - zeros.float().repeat_interleave(group, 0))
                           * scales.float().repeat_interleave(group, 0))
        if not torch.allclose(fn().float(), ref, rtol=5e-2, atol=5e-2 * math.sqrt(K)):
            return ValueError("torch int4 result does not match the reference (packing convention)")
        return fn
    except Exception as exc:  # noqa: BLE001 - the op's signature differs across torch versions
        return exc


def bench_gemm(device: str, bw: float, shapes=((4096, 11008), (11008, 4096)), ms=(1, 16, 64, 256),
               group: int = 128) -> list[Row]:
    """`lmdepot w4a16`: kernels/w4a16.py on the workspace layout; `lmdepot w4a16 kmajor`: the engine's
    path on the layout it repacks at load (triton_ops.linear_int4_packed: K-major GEMV, GEMM, or
    dequantize + cuBLAS by M)."""
    from lmdepot.formats.int4 import quantize_int4_rtn, unpack_int4
    from lmdepot.runtime.kernels import w4a16_gemv
    from lmdepot.runtime.kernels.w4a16 import w4a16_linear
    from lmdepot.runtime.ops.triton_ops import linear_int4_packed

    rows = []
    for K, N in shapes:
        w = torch.randn(K, N) * 0.02
        q = {k: v.to(device) for k, v in quantize_int4_rtn(w, group).items()}
        w_bf16 = w.to(device, torch.bfloat16)
        codes = unpack_int4(q["qweight"])
        packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            x16 = x.to(torch.float16)
            case = f"{K}x{N} M={M}"
            act = M * (K + N) * 2
            dense_bytes = K * N * 2 + act
            int4_bytes = K * N // 2 + q["scales"].numel() * 4 + act
            t = _time_us(lambda: x @ w_bf16)
            rows.append(Row(case, "cublas bf16", t, dense_bytes, _pct(dense_bytes, bw, t)))
            t = _time_us(lambda: w4a16_linear(x16, q["qweight"], q["scales"], q["zeros"]))
            rows.append(Row(case, "lmdepot w4a16", t, int4_bytes, _pct(int4_bytes, bw, t)))
            t = _time_us(lambda: linear_int4_packed(x16, packed))
            rows.append(Row(case, "lmdepot w4a16 kmajor", t, int4_bytes, _pct(int4_bytes, bw, t)))
            fn = _torch_int4(x, codes, q["scales"], q["zeros"], group)
            if callable(fn):
                t = _time_us(fn)
                rows.append(Row(case, "torch int4pack_mm", t, int4_bytes, _pct(int4_bytes, bw, t)))
            else:
                rows.append(Row(case, "torch int4pack_mm", math.nan, int4_bytes, math.nan,
                                f"unavailable: {type(fn).__name__}"))
    return rows


def bench_w8a8(device: str, bw: float, shapes=((4096, 11008), (11008, 4096)), ms=(1, 16, 256, 1024, 4096),
               config: dict | None = None) -> list[Row]:
    """W8A8 GEMM (activations already int8, as the fused norm hands them over) and with its per-token
    quant, vs cuBLAS bf16 and torch._int_mm (int32 out, no epilogue; needs M > 16)."""
    from lmdepot.runtime.kernels.rms_norm_quant import quant_per_token
    from lmdepot.runtime.kernels.w8a8 import w8a8_linear

    rows = []
    for K, N in shapes:
        w = torch.randn(K, N) * 0.02
        w_bf16 = w.to(device, torch.bfloat16)
        w_scales = (w.abs().amax(0) / 127).to(device)
        wq = torch.round(w.to(device) / w_scales).clamp(-127, 127).to(torch.int8).t().contiguous()  # (N, K)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            xq, xs = quant_per_token(x)
            case = f"{K}x{N} M={M}"
            flops = 2 * M * N * K
            dense_bytes = K * N * 2 + M * (K + N) * 2
            int8_bytes = K * N + N * 4 + M * (K + 4) + M * N * 2
            t_ref = _time_us(lambda: x @ w_bf16)
            rows.append(Row(case, "cublas bf16", t_ref, dense_bytes, _pct(dense_bytes, bw, t_ref),
                            f"{flops / t_ref / 1e6:.0f} TFLOP/s"))
            t = _time_us(lambda: w8a8_linear(xq, xs, wq, w_scales, out_dtype=torch.bfloat16, config=config))
            rows.append(Row(case, "lmdepot w8a8 gemm", t, int8_bytes, _pct(int8_bytes, bw, t),
                            f"{flops / t / 1e6:.0f} TFLOP/s, {t_ref / t:.2f}x cublas bf16"))
            t = _time_us(lambda: w8a8_linear(*quant_per_token(x), wq, w_scales, out_dtype=torch.bfloat16,
                                             config=config))
            rows.append(Row(case, "lmdepot w8a8 quant + gemm", t, int8_bytes + M * K * 2, _pct(int8_bytes, bw, t),
                            f"{t_ref / t:.2f}x cublas bf16"))
            if M > 16:
                wq_kn = wq.t()
                t = _time_us(lambda: torch._int_mm(xq, wq_kn))
                rows.append(Row(case, "torch _int_mm (int32 out)", t, int8_bytes, _pct(int8_bytes, bw, t),
                                f"{flops / t / 1e6:.0f} TOP/s"))
            else:
                rows.append(Row(case, "torch _int_mm (int32 out)", math.nan, int8_bytes, math.nan,
                                "unavailable: needs M > 16"))
    return rows


LLAMA7B_DENSE = tuple((K, N) for K, N, _ in linear_shapes("llama2-7b"))


def bench_gemv(device: str, bw: float, shapes=LLAMA7B_DENSE, ms=(1, 4)) -> list[Row]:
    """Dense bf16 decode GEMV (kernels/gemv.py, heuristic config; the engine's path for one-row linears) vs
    cuBLAS F.linear on the runtime's (N, K) weight: Llama-2-7B's qkv, o, gate/up, down, lm_head."""
    from lmdepot.runtime.kernels.gemv import gemv

    rows = []
    for K, N in shapes:
        w = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            case, nbytes = f"{K}x{N} M={M}", (N * K + M * (K + N)) * 2
            t_ref = _time_us(lambda: torch.nn.functional.linear(x, w))
            rows.append(Row(case, "cublas bf16 F.linear", t_ref, nbytes, _pct(nbytes, bw, t_ref)))
            t = _time_us(lambda: gemv(x, w))
            rows.append(Row(case, "lmdepot gemv", t, nbytes, _pct(nbytes, bw, t), f"{t_ref / t:.2f}x cublas"))
    return rows


def bench_decode_attention(device: str, bw: float, cases=((1, 4096), (16, 2048), (64, 1024))) -> list[Row]:
    from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention

    rows = []
    page, hq, hkv, d = 64, 32, 8, 128
    for batch, seq in cases:
        pages = -(-seq // page)
        k = torch.randn(batch * pages, page, hkv, d, device=device, dtype=torch.float16)
        v = torch.randn_like(k)
        tables = torch.randperm(batch * pages, device=device).reshape(batch, pages).to(torch.int32)
        lens = torch.full((batch,), seq, device=device, dtype=torch.int32)
        q = torch.randn(batch, hq, d, device=device, dtype=torch.float16)
        kv_bytes = 2 * batch * seq * hkv * d * 2
        t = _time_us(lambda: paged_decode_attention(q, k, v, tables, lens))
        rows.append(Row(f"decode attn bs={batch} seq={seq} 32q/8kv d128", "lmdepot paged", t, kv_bytes,
                        _pct(kv_bytes, bw, t)))
        kc = k.reshape(batch, pages * page, hkv, d)[:, :seq].transpose(1, 2).repeat_interleave(hq // hkv, 1)
        vc = v.reshape(batch, pages * page, hkv, d)[:, :seq].transpose(1, 2).repeat_interleave(hq // hkv, 1)
        qs = q.unsqueeze(2)
        t = _time_us(lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc))
        rows.append(Row(f"decode attn bs={batch} seq={seq} 32q/8kv d128", "torch sdpa (contiguous, expanded kv)",
                        t, kv_bytes * (hq // hkv), _pct(kv_bytes * (hq // hkv), bw, t)))
    return rows


PREFILL_CASES = (("prefill 1x4096", [(4096, 4096)]), ("extend 4x1024 +1024 cached", [(1024, 2048)] * 4),
                 ("mixed 4x512 + 64 decodes @2048", [(512, 512)] * 4 + [(1, 2048)] * 64))


def bench_prefill_attention(device: str, bw: float, cases=PREFILL_CASES) -> list[Row]:
    """Paged prefill/extend/mixed attention (one launch; cases are [(q_len, ctx_len)] per batch)
    vs torch SDPA flash on the same shapes with contiguous K/V expanded to the q heads.
    Compute-bound: the note gives TFLOP/s over the (query, visible key) pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from lmdepot.runtime.kernels.prefill_attention import prefill_attention

    page, hq, hkv, d, dt = 64, 32, 8, 128, torch.float16
    rows = []
    for name, seqs in cases:
        pages = [-(-n // page) for _, n in seqs]
        k = torch.randn(sum(pages), page, hkv, d, device=device, dtype=dt)
        v = torch.randn_like(k)
        perm = torch.randperm(sum(pages)).to(torch.int32)
        tables = torch.zeros(len(seqs), max(pages), dtype=torch.int32)
        for i, p in enumerate(pages):
            tables[i, :p] = perm[sum(pages[:i]):sum(pages[:i]) + p]
        tables = tables.to(device)
        starts = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(device, torch.int32)
        lens = torch.tensor([n for _, n in seqs], device=device, dtype=torch.int32)
        q = torch.randn(int(starts[-1]), hq, d, device=device, dtype=dt)
        pairs = sum(ql * (n - ql) + ql * (ql + 1) // 2 for ql, n in seqs)
        flops = 4 * pairs * hq * d
        nbytes = 2 * q.numel() * 2 + 2 * sum(n for _, n in seqs) * hkv * d * 2   # q, out, K/V once
        max_q = max(ql for ql, _ in seqs)
        case = f"attn {name}"
        t = _time_us(lambda: prefill_attention(q, k, v, tables, starts, lens, max_q))
        rows.append(Row(case, "lmdepot paged prefill (32q/8kv d128)", t, nbytes, _pct(nbytes, bw, t),
                        f"{flops / (t * 1e-6) / 1e12:.0f} TFLOP/s"))
        if len(set(seqs)) != 1:
            rows.append(Row(case, "torch sdpa flash", math.nan, nbytes, math.nan, "no single-launch peer"))
            continue
        (ql, n), b = seqs[0], len(seqs)
        qs = torch.randn(b, hq, ql, d, device=device, dtype=dt)
        ks = torch.randn(b, hq, n, d, device=device, dtype=dt)
        vs = torch.randn_like(ks)
        mask = causal_lower_right(ql, n) if ql != n else None   # queries at the end of the context
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t = _time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, is_causal=mask is None))
            rows.append(Row(case, "torch sdpa flash (contiguous kv)", t, nbytes, _pct(nbytes, bw, t),
                            f"{flops / (t * 1e-6) / 1e12:.0f} TFLOP/s"))
        except Exception as exc:  # noqa: BLE001 - backend support differs across torch builds and masks
            rows.append(Row(case, "torch sdpa flash (contiguous kv)", math.nan, nbytes, math.nan,
                            f"unavailable: {type(exc).__name__}"))
    return rows


def _pct(nbytes: int, bw: float, us: float) -> float:
    return 100.0 * (nbytes / bw) / (us * 1e-6)


SECTIONS = ("w4a16", "w8a8", "attention", "gemv")


def run(device: str = "cuda", as_json: bool = False, only: tuple[str, ...] = SECTIONS) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        from lmdepot.errors import LmdepotError

        raise LmdepotError("bench kernels needs a CUDA GPU (none visible)")
    bw = copy_bandwidth(device)
    rows = []
    for name, fn in (("w4a16", bench_gemm), ("w8a8", bench_w8a8), ("attention", bench_decode_attention),
                     ("attention", bench_prefill_attention), ("gemv", bench_gemv)):
        if name in only:
            rows += fn(device, bw)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else device,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "copy_bandwidth_TBps": bw / 1e12}
    if as_json:
        return json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
    lines = [f"device {meta['device']}  date {meta['date']}  torch {meta['torch']}  triton {meta['triton']}",
             f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", "",
             f"{'case':40} {'impl':34} {'us':>9} {'MB moved':>9} {'roofline':>9}"]
    for r in rows:
        lines.append(f"{r.case:40} {r.impl:34} {r.us:9.1f} {r.bytes / 1e6:9.2f} {r.roofline_pct:8.1f}% {r.note}")
    return "\n".join(lines) + "\n"
