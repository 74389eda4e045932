"""`lmdepot eval ppl` against a direct HF transformers computation, and its bad input."""

import random
import re

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.eval.hf_ppl import hf_perplexity
from lmdepot.eval.ppl import windows
from lmdepot.runtime.engine import load_tokenizer
from runtime_helpers import VOCAB, eval_ppl_error


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(200)))
    return path


def ppl_cli(*args) -> float:
    r = CliRunner().invoke(main, ["eval", "ppl", *map(str, args)])
    assert r.exit_code == 0, (r.output, r.exception)
    return float(re.match(r"ppl (\S+) over", r.stdout).group(1))


def test_ppl_matches_hf(tiny, text_file):
    hf, ws = tiny("llama")
    ids = load_tokenizer(ws)(text_file.read_text(), add_special_tokens=False)["input_ids"]
    want = hf_perplexity(hf, windows(ids, 48, 3))
    # chunk 16 < seqlen: the second and third chunks attend to cached KV through the paged path
    got = ppl_cli(ws, "--text", text_file, "--seqlen", 48, "--samples", 3, "--chunk", 16, "--dtype", "fp32")
    assert got == pytest.approx(want, rel=1e-5)
    assert 100 < want < 400   # a random model over 160 words: near-uniform, not degenerate


def test_quantized_kv_ppl_close_but_not_equal(tiny, text_file):
    _, ws = tiny("llama")
    args = (ws, "--text", text_file, "--seqlen", 48, "--samples", 3, "--chunk", 16, "--dtype", "fp32")
    base = ppl_cli(*args)
    int8 = ppl_cli(*args, "--quant-policy", 8, "--kv-group-size", 16)
    int4 = ppl_cli(*args, "--quant-policy", 4, "--kv-group-size", 16)
    assert int8 != base and abs(int8 / base - 1) < 1e-3
    assert int4 != base and abs(int4 / base - 1) < 3e-2


def test_bad_input(tiny, text_file, tmp_path):
    _, ws = tiny("llama")
    assert "--quant-policy 2 is not one of 0, 4, 8" in eval_ppl_error(ws, "--quant-policy", 2)
    assert "--kv-scales dynamic" in eval_ppl_error(ws, "--quant-policy", 8, "--kv-scales", "dynamic")
    assert "no KV scale files" in eval_ppl_error(ws, "--quant-policy", 4, "--kv-scales", "static")
    assert "no such file" in eval_ppl_error(ws, "--text", tmp_path / "missing.txt")
    assert "fewer than --seqlen 4096" in eval_ppl_error(ws, "--text", text_file, "--seqlen", 4096)
