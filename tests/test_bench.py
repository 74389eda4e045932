"""`lmdepot bench ...` end to end on the CPU with a tiny model and tiny workloads.

Timings on a CPU mean nothing; what is checked is that every request completes, token counts are
exact (ignore_eos), the JSON has its keys, percentiles are ordered and bad inputs are one line.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from lmdepot.bench import workload
from lmdepot.bench.workload import BenchError, Request
from lmdepot.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def tokenizer(hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


def _ordered(p: dict) -> bool:
    return p["p50"] <= p["p90"] <= p["p99"]


def _sharegpt_file(tmp_path, convs) -> str:
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": c} for c in convs]))
    return str(path)


SHAREGPT = [
    [{"from": "human", "value": "w5 w6 w7"}, {"from": "gpt", "value": "w8 w9 w10 w11"}],
    [{"from": "gpt", "value": "w5"}, {"from": "human", "value": "w6"}],                # no human-then-gpt: skipped
    [{"from": "human", "value": "w12 w13"}],                                           # no reply: skipped
    [{"from": "human", "value": "w20 w21 w22 w23 w24"}, {"from": "gpt", "value": "w30 w31"},
     {"from": "human", "value": "w40"}, {"from": "gpt", "value": "w41"}],            # first exchange only
]


# --- workload ---------------------------------------------------------------------------------
def test_synthetic_workload_is_seeded_and_in_range():
    a = workload.synthetic(20, (4, 9), (3, 5), vocab=100, seed=7)
    assert a == workload.synthetic(20, (4, 9), (3, 5), vocab=100, seed=7)
    assert a != workload.synthetic(20, (4, 9), (3, 5), vocab=100, seed=8)
    assert all(4 <= len(r.prompt_ids) <= 9 and 3 <= r.output_len <= 5 for r in a)
    assert all(3 <= t < 100 for r in a for t in r.prompt_ids)
    assert {len(r.prompt_ids) for r in a} != {4}     # the lengths do vary


def test_sharegpt_parsing(tmp_path, tokenizer):
    pairs = workload.load_sharegpt(_sharegpt_file(tmp_path, SHAREGPT))
    assert pairs == [("w5 w6 w7", "w8 w9 w10 w11"), ("w20 w21 w22 w23 w24", "w30 w31")]
    reqs = workload.sharegpt(pairs, tokenizer, None)
    assert reqs == [Request(tuple(tokenizer.encode("w5 w6 w7", add_special_tokens=False)), 4),
                    Request(tuple(tokenizer.encode("w20 w21 w22 w23 w24", add_special_tokens=False)), 2)]
    assert [len(r.prompt_ids) for r in reqs] == [3, 5]
    # max_len drops what cannot fit a session; n draws (seeded, with repeats once n > len)
    assert workload.sharegpt(pairs + [("w1 w2", "w3 w4 w5 w6 w7 w8")], tokenizer, None, max_len=7) == reqs
    with pytest.raises(BenchError, match="no conversation fits"):
        workload.sharegpt(pairs, tokenizer, None, max_len=6)
    drawn = workload.sharegpt(pairs, tokenizer, 5, seed=3)
    assert len(drawn) == 5 and set(drawn) <= set(reqs) and drawn == workload.sharegpt(pairs, tokenizer, 5, seed=3)


@pytest.mark.parametrize("text, message", [
    ("[1, 2", "not valid JSON"),
    ('{"conversations": []}', "expected a JSON list"),
    ('[{"conversations": [{"from": "gpt", "value": "x"}]}]', "no usable conversation"),
])
def test_sharegpt_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(BenchError, match=message):
        workload.load_sharegpt(path)


def test_parsers():
    assert workload.parse_ints("1,16,64", "--concurrency") == [1, 16, 64]
    assert workload.parse_cases("1x128, 2048X128") == [(1, 128), (2048, 128)]
    assert workload.parse_range("64-512", "--prompt") == (64, 512)
    assert workload.parse_range("256", "--output") == (256, 256)
    for fn, arg in [(workload.parse_ints, "1,x"), (workload.parse_ints, "0"), (workload.parse_ints, ""),
                    (workload.parse_range, "9-3"), (workload.parse_range, "a")]:
        with pytest.raises(BenchError):
            fn(arg, "--opt")
    for bad in ["128", "1x0", "ax2", ""]:
        with pytest.raises(BenchError):
            workload.parse_cases(bad)


def test_linear_shapes_are_one_ranks_fused_linears():
    """The tuning scripts' shapes: Llama-2-7B's (K, N) as the runtime fuses them, one rank's at tp 2 (qkv,
    gate/up, lm_head split along N; o, down along K), Llama-3-8B's GQA qkv of 32 + 2 x 8 heads."""
    from lmdepot.bench.shapes import linear_shapes

    assert linear_shapes("llama2-7b") == [(4096, 12288, "qkv"), (4096, 4096, "o"), (4096, 22016, "gate/up"),
                                          (11008, 4096, "down"), (4096, 32000, "lm_head")]
    assert linear_shapes("llama2-7b", 2) == [(4096, 6144, "qkv"), (2048, 4096, "o"), (4096, 11008, "gate/up"),
                                             (5504, 4096, "down"), (4096, 16000, "lm_head")]
    assert linear_shapes("llama3-8b")[0] == (4096, 6144, "qkv")


def test_percentiles_nearest_rank():
    p = workload.percentiles([i / 1000 for i in range(1, 101)])   # 1..100 ms
    assert p == pytest.approx({"p50": 50.0, "p90": 90.0, "p99": 99.0})
    assert all(math.isnan(v) for v in workload.percentiles([]).values())


# --- the benches, end to end ---------------------------------------------------------------------
def test_generation_grid(hf, tmp_path):
    from lmdepot.bench.generation import run

    out = tmp_path / "g.json"
    result, text = run(model=str(hf), concurrency=(1, 3), cases=((4, 5), (9, 2)), device="cpu", json_path=str(out))
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=float))
    assert [(r["concurrency"], r["prompt_len"], r["output_len"]) for r in result["rows"]] == \
        [(1, 4, 5), (3, 4, 5), (1, 9, 2), (3, 9, 2)]
    for r in result["rows"]:
        assert r["completed"] == r["concurrency"]
        assert r["output_tokens"] == r["concurrency"] * r["output_len"]
        assert _ordered(r["first_token_ms"]) and _ordered(r["per_token_ms"])
        assert r["output_tok_s"] > 0 and r["peak_memory_GB"] > 0 and 0 < r["roofline_pct"] < 100
    m = result["meta"]
    assert m["layers"] == 2 and m["copy_bandwidth_GBps"] > 0 and m["weight_bytes"] > 0
    assert m["kv_bytes_per_token"] == 2 * 2 * 4 * 8 * 4          # K+V x layers x kv heads x head dim x fp32
    assert {"device", "date", "torch", "triton", "transformers"} <= set(m)
    assert "roofline" in text and "copy bandwidth" in text


def test_throughput_synthetic_and_kv_int8(hf, tmp_path):
    from lmdepot.bench.throughput import run

    result, text = run(model=str(hf), n=5, prompt=(3, 9), output=(4, 4), seed=1, device="cpu", quant_policy=8,
                       json_path=str(tmp_path / "t.json"))
    e, m = result["engine"], result["meta"]
    assert e["requests"] == e["completed"] == 5 and e["output_tokens"] == 20 == m["expected_output_tokens"]
    assert m["prompt_tokens"] == sum(len(r.prompt_ids) for r in workload.synthetic(5, (3, 9), (4, 4), 250, 1))
    assert e["output_tok_s"] == pytest.approx(20 / e["elapsed_s"]) and e["req_s"] == pytest.approx(5 / e["elapsed_s"])
    assert m["quant_policy"] == 8 and m["kv_bytes_per_token"] < 2 * 2 * 4 * 8 * 4
    assert set(json.loads((tmp_path / "t.json").read_text())) == {"engine", "meta"}   # no peer: no "hf"
    assert "lmdepot" in text


def test_warmup_runs_the_workload_shapes_without_priming_its_prefix_cache(hf, tmp_path):
    """bench's warmup runs requests of the workload's prompt lengths (cut to one step's budget) with other
    tokens: their blocks land in the prefix cache, the timed requests' blocks do not."""
    from lmdepot.bench.models import prepare
    from lmdepot.bench.offline import open_llm, warmup
    from lmdepot.runtime.block_manager import chain_hash

    _, ws = prepare(str(hf), None, None, tmp_path)
    llm = open_llm(ws, "cpu", 8, 160, max_num_batched_tokens=80)
    try:
        bs, vocab = llm.engine.bm.block_size, llm.engine.cfg.vocab_size
        requests = workload.synthetic(6, (90, 120), (4, 4), vocab, seed=3)
        assert bs <= 80
        first_block = lambda ids: chain_hash(None, ids[:bs])   # noqa: E731
        warmup(llm, vocab, requests)
        cached = set(llm.engine.bm.by_hash)
        span = vocab - 3
        assert all(first_block([3 + (t + 1) % span for t in r.prompt_ids[:80]]) in cached for r in requests)
        assert not any(first_block(list(r.prompt_ids)) in cached for r in requests)
    finally:
        llm.close()


def test_throughput_sharegpt(hf, tmp_path):
    from lmdepot.bench.throughput import run

    result, _ = run(model=str(hf), n=4, dataset=_sharegpt_file(tmp_path, SHAREGPT), seed=2, device="cpu")
    assert result["engine"]["completed"] == 4
    assert result["engine"]["output_tokens"] == result["meta"]["expected_output_tokens"]
    assert result["engine"]["output_tokens"] in range(8, 17)    # 4 replies of 2 or 4 tokens


def test_throughput_hf_peer(hf):
    """HF's continuous batching on the same requests (generate_batch runs on the CPU, slowly)."""
    import transformers

    if not hasattr(transformers.GenerationMixin, "generate_batch"):
        pytest.skip(f"transformers {transformers.__version__} has no generate_batch")
    from lmdepot.bench.throughput import run

    result, text = run(model=str(hf), n=2, prompt=(3, 5), output=(3, 3), peer="hf", device="cpu")
    assert result["hf"].get("output_tokens") == 6 == result["engine"]["output_tokens"], result["hf"]
    assert result["engine_vs_hf"] > 0 and "lmdepot / HF" in text


def test_serving_through_the_http_server(hf, tmp_path):
    from lmdepot.bench.serving import run

    result, text = run(model=str(hf), n=4, prompt=(3, 6), output=(5, 5), concurrency=2, compare_offline=True,
                       device="cpu", json_path=str(tmp_path / "s.json"))
    s, o = result["serving"], result["offline"]
    assert s["errors"] == 0 and s["completed"] == 4 and s["output_tokens"] == 20
    assert o["completed"] == 4 and o["output_tokens"] == 20
    assert _ordered(s["ttft_ms"]) and _ordered(s["itl_ms"]) and s["ttft_ms"]["p50"] > 0
    assert result["serving_vs_offline"] > 0 and "server / offline" in text


def test_coldstart(hf, tmp_path):
    from lmdepot.bench.coldstart import run

    result, text = run(model=str(hf), device="cpu", json_path=str(tmp_path / "c.json"))
    p = result["phases"]
    assert result["tokens"] == 1
    assert p["total_s"] >= p["pull_s"] + p["load_s"] + p["first_token_s"] > 0
    assert result["meta"]["weight_bytes"] > 0 and "first_token" in text


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
def test_bench_model_builds_checkpoint_and_workspaces(tmp_path, monkeypatch, arch):
    """`bench model` at a tiny size: the HF dir, fp16 and int4 workspaces; InternLM2 (written tensor by
    tensor: no transformers class) loads in the engine and generates."""
    from lmdepot.bench import models
    from lmdepot.runtime.llm import LLM
    from lmdepot.runtime.sequence import SamplingParams

    monkeypatch.setitem(models.SHAPES, "tiny", dict(
        arch=arch, hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=3, vocab_size=120, max_position_embeddings=256, rope_theta=1e6))
    r = models.build("tiny", tmp_path / "m", layers=2, int4=True)
    assert r["layers"] == 2 and r["convert_fp16_s"] > 0 and r["convert_int4_rtn_s"] > 0
    for kind, weight_type in (("fp16", "fp16"), ("int4", "int4")):
        with LLM(tmp_path / "m" / kind, device="cpu", quiet=True) as llm:
            cfg = llm.engine.cfg
            assert (cfg.weight_type, cfg.kv_head_num, cfg.num_layer, cfg.vocab_size) == (weight_type, 2, 2, 120)
            out = llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(out.token_ids) == 3
    with pytest.raises(BenchError, match="not empty"):
        models.build("tiny", tmp_path / "m")


# --- bad inputs: one line, exit 2 -------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["throughput", "--dataset", "/nonexistent/sg.json"], "no such file"),
    (["throughput", "--dataset", "{bad}"], "not valid JSON"),
    (["serving", "--dataset", "{bad}"], "not valid JSON"),
    (["generation", "--concurrency", "1,x"], "--concurrency"),
    (["generation", "--cases", "128"], "PROMPTxOUTPUT"),
    (["throughput", "--prompt", "512-64"], "--prompt"),
    (["generation", "--model", "/nonexistent"], "no such directory"),
    (["coldstart", "--registry", "/tmp/x"], "--ref"),
])
def test_bad_inputs_are_one_line(tmp_path, args, message):
    if "{bad}" in args:
        bad = tmp_path / "bad.json"
        bad.write_text("[{")
        args = [str(bad) if a == "{bad}" else a for a in args]
    r = CliRunner().invoke(main, ["bench", *args, "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_throughput_tensor_parallel(hf):
    """--tp 2 converts for two ranks; the roofline's bytes are one rank's (half the weights and KV)."""
    from lmdepot.bench.throughput import run

    one, _ = run(model=str(hf), n=3, prompt=(4, 6), output=(3, 3), device="cpu")
    two, _ = run(model=str(hf), n=3, prompt=(4, 6), output=(3, 3), device="cpu", tp=2)
    assert two["meta"]["tp"] == 2 and two["engine"]["completed"] == 3 and two["engine"]["output_tokens"] == 9
    assert two["meta"]["kv_bytes_per_token"] * 2 == one["meta"]["kv_bytes_per_token"]
    assert abs(two["meta"]["weight_bytes"] * 2 - one["meta"]["weight_bytes"]) < 0.1 * one["meta"]["weight_bytes"]


def test_generation_hf_peer(hf):
    from lmdepot.bench.generation import run

    result, text = run(model=str(hf), concurrency=(2,), cases=((4, 3),), peer="hf", device="cpu")
    (row,) = result["rows"]
    assert row["hf"]["decode_tok_s"] > 0 and row["hf"]["ttft_ms"] > 0
    assert row["engine_vs_hf"] == pytest.approx(row["decode_tok_s"] / row["hf"]["decode_tok_s"])
    assert "x" in text.splitlines()[-1]     # the vs HF column is filled


def test_record_builds_counts_triton_builds_and_restores_the_hooks():
    """record_builds hooks Triton's JIT (called as Triton calls it: keywords, before and after each
    build), chains hooks that were set, restores them, and the throughput report names the builds."""
    from types import SimpleNamespace

    from triton import knobs

    from lmdepot.bench import throughput
    from lmdepot.bench.builds import record_builds, summary

    seen = []
    knobs.runtime.jit_cache_hook = lambda **kw: seen.append(("before", kw["key"]))
    knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["key"]))
    try:
        prior = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
        with record_builds() as builds:
            for name in ("_kernel", "_split_kernel", "_kernel"):
                fn = SimpleNamespace(module="lmdepot.runtime.kernels.prefill_attention", name=name)
                assert not knobs.runtime.jit_cache_hook(key=name, fn=fn, repr=name)   # a true value skips the build
                knobs.runtime.jit_post_compile_hook(key=name, fn=fn, repr=name)
        assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == prior
    finally:
        knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
    assert [n for n, _ in builds] == ["prefill_attention._kernel", "prefill_attention._split_kernel",
                                      "prefill_attention._kernel"] and all(s >= 0 for _, s in builds)
    assert seen == [("before", "_kernel"), ("after", "_kernel"), ("before", "_split_kernel"),
                    ("after", "_split_kernel"), ("before", "_kernel"), ("after", "_kernel")]
    s = summary(builds)
    assert (s["count"], s["kernels"]) == (3, {"prefill_attention._kernel": 2, "prefill_attention._split_kernel": 1})
    engine = {"output_tok_s": 1.0, "req_s": 1.0, "elapsed_s": 1.0, "ttft_ms": {"p50": 1.0}, "itl_ms": {"p50": 1.0},
              "triton_builds": s}
    meta = {"model": "m", "layers": 1, "requests": 1, "prompt_tokens": 1, "expected_output_tokens": 1,
            "quant_policy": 0, "kv_cache_tokens": 1, "max_num_batched_tokens": 1, "device": "cpu", "date": "d",
            "torch": "t", "triton": "t", "transformers": "t", "copy_bandwidth_GBps": 1.0}
    text = throughput.render({"meta": meta, "engine": engine})
    assert "includes 3 Triton kernel builds" in text
    assert "prefill_attention._kernel x2, prefill_attention._split_kernel x1" in text
    assert "Triton" not in throughput.render({"meta": meta, "engine": engine | {"triton_builds": summary([])}})
    from lmdepot.bench import generation

    pct = {"p50": 1.0, "p90": 1.0, "p99": 1.0}
    row = {"concurrency": 16, "prompt_len": 128, "output_len": 8, "first_token_ms": pct, "per_token_ms": pct,
           "output_tok_s": 1.0, "roofline_pct": 1.0, "peak_memory_GB": 1.0, "triton_builds": s}
    text = generation.render({"meta": meta | {"weight_bytes": 1, "kv_bytes_per_token": 1}, "rows": [row]})
    assert "16 x 128x8 includes 3 Triton kernel builds" in text
