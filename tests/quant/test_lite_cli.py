"""`lmdepot lite` bad input: every refusal is one `error: ...` line with exit status 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.convert.calibrate import CalibStats
from lmdepot.convert.converter import ConvertOptions, convert_model


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["lite", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--w-bits", "8"], "--w-bits 8: only 4-bit weights are supported"),
    (["--w-bits", "3"], "--w-bits 3: only 4-bit weights are supported"),
    (["--w-group-size", "100"], "--w-group-size 100: must be one of 32, 64, 128, 256"),
    (["--w-group-size", "0"], "--w-group-size 0: must be one of 32, 64, 128, 256"),
    (["--method", "gptq"], "--method gptq: must be awq or rtn"),
    (["--calib-samples", "0"], "--calib-samples 0: expected a positive integer or 'auto'"),
    (["--tp", "3"], "--tp 3 does not divide the model's heads"),
])
def test_auto_awq_refuses_bad_options(tiny_checkpoint, calib_txt, tmp_path, flags, message):
    args = ["auto_awq", str(tiny_checkpoint("llama")), "--calib-dataset", str(calib_txt(400)),
            "--calib-samples", "2", "--calib-seqlen", "32", "--w-group-size", "32", "--dst-path", str(tmp_path / "ws")]
    assert message in _one_line_error(args + flags)
    assert not (tmp_path / "ws").exists()


def test_calibration_text_too_short_says_how_much_is_needed(tiny_checkpoint, calib_txt, tmp_path):
    hf, text = str(tiny_checkpoint("llama")), str(calib_txt(100))
    base = ["calibrate", hf, "--calib-dataset", text, "--calib-seqlen", "32", "--work-dir", str(tmp_path / "c")]
    line = _one_line_error(base + ["--calib-samples", "8"])
    assert "too short: 8 samples x 32 tokens need 256 tokens, it has 100 (enough for --calib-samples 3" in line
    assert "not one window" in _one_line_error(base[:4] + ["--calib-seqlen", "200", "--work-dir", str(tmp_path / "c")])
    assert "too short" in _one_line_error(["auto_awq", hf, "--calib-dataset", text, "--calib-seqlen", "64",
                                           "--calib-samples", "4", "--w-group-size", "32",
                                           "--dst-path", str(tmp_path / "ws")])
    with pytest.warns(UserWarning, match="holds 100 tokens: using 3 samples of 32 tokens"):
        result = CliRunner().invoke(main, ["lite", *base, "--calib-samples", "auto"])
    assert result.exit_code == 0, result.output
    assert CalibStats(tmp_path / "c").attrs["calib"]["samples"] == 3


def test_bad_calibration_datasets(tiny_checkpoint, tmp_path):
    hf = str(tiny_checkpoint("llama"))
    run = (lambda ds: _one_line_error(["calibrate", hf, "--calib-dataset", ds, "--work-dir", str(tmp_path / "c")]))
    assert "neither 'pydoc' nor an existing .txt/.jsonl file" in run(str(tmp_path / "missing.txt"))
    (tmp_path / "a.csv").write_text("x")
    assert "must end in .txt or .jsonl" in run(str(tmp_path / "a.csv"))
    (tmp_path / "b.jsonl").write_text('{"text": "w1 w2"}\n{"txt": 3}\n')
    assert 'b.jsonl:2: each line must be a string or an object with a "text" string' in run(str(tmp_path / "b.jsonl"))


def test_kv_qparams_refuses_bad_bits_mismatched_calibration_and_tp(tiny_checkpoint, calib_txt, tmp_path):
    calib = tmp_path / "calib"
    result = CliRunner().invoke(main, ["lite", "calibrate", str(tiny_checkpoint("llama")), "--calib-dataset",
                                       str(calib_txt(400)), "--calib-samples", "2", "--calib-seqlen", "32",
                                       "--work-dir", str(calib)])
    assert result.exit_code == 0, result.output
    ws = tmp_path / "ws"
    convert_model(str(tiny_checkpoint("llama")), ws, ConvertOptions(tp=2))
    assert "--kv-bits 6: must be 4 or 8" in _one_line_error(["kv_qparams", str(calib), str(ws), "--kv-bits", "6"])
    assert "--tp 1 differs from the workspace's tensor_para_size = 2" in _one_line_error(
        ["kv_qparams", str(calib), str(ws), "--tp", "1"])
    deeper = tmp_path / "ws3"
    convert_model(str(tiny_checkpoint("llama", num_hidden_layers=3)), deeper, ConvertOptions())
    assert "calibration data is for a model with num_layer = 2, but workspace" in _one_line_error(
        ["kv_qparams", str(calib), str(deeper)])
    fewer_kv = tmp_path / "ws-kv2"
    convert_model(str(tiny_checkpoint("llama", num_key_value_heads=2)), fewer_kv, ConvertOptions(tp=2))
    assert "kv_head_num = 4, but workspace" in _one_line_error(["kv_qparams", str(calib), str(fewer_kv)])
    assert "no stats.zarr; run `lmdepot lite calibrate` first" in _one_line_error(
        ["kv_qparams", str(tmp_path), str(ws)])
    assert "not a workspace" in _one_line_error(["kv_qparams", str(calib), str(tmp_path)])
    assert not any("past_kv_scale" in p.name for p in (ws / "weights").iterdir())
