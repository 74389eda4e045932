"""Workspace format v1: config.ini round trip and validation, manifest, int4 packing, KV scale files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmdepot.errors import FormatError
from lmdepot.formats.config import WorkspaceConfig, model_keys, runtime_keys
from lmdepot.formats.int4 import dequantize_int4, pack_int4, quantize_int4_rtn, unpack_int4
from lmdepot.formats.kv_scales import read_kv_scales, write_kv_scales
from lmdepot.formats.layout import classify
from lmdepot.formats.manifest import Manifest, check_relative_path


def _cfg(**kw) -> WorkspaceConfig:
    base = dict(model_name="m", head_num=8, kv_head_num=2, size_per_head=16, hidden_units=128, vocab_size=1000,
                num_layer=2, inter_size=256, rotary_embedding=16, norm_eps=1e-5, rope_theta=500000.0)
    return WorkspaceConfig(**(base | kw))


def test_config_round_trips_exactly():
    cfg = _cfg(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, original_max_position_embeddings=8192, norm_eps=9.999999747378752e-06,
               cache_max_entry_count=0.55).validate()
    text = cfg.to_ini()
    again = WorkspaceConfig.from_ini(text)
    assert again == cfg and again.to_ini() == text
    assert set(model_keys()).isdisjoint(runtime_keys())
    assert {"session_len", "quant_policy", "cache_block_seq_len"} <= set(runtime_keys())


def test_unknown_keys_round_trip_with_a_warning():
    text = _cfg().validate().to_ini() + "future_key = 42\n"
    with pytest.warns(UserWarning, match="future_key"):
        cfg = WorkspaceConfig.from_ini(text)
    assert cfg.extra == {"future_key": "42"}
    assert cfg.to_ini() == text


@pytest.mark.parametrize("edit, message", [
    (("head_num", "abc"), "head_num = 'abc' is not an integer"),
    (("norm_eps", "x"), "norm_eps = 'x' is not a number"),
    (("weight_type", "int3"), "weight_type = 'int3' is not one of"),
    (("kv_head_num", "3"), "head_num = 8 is not a multiple of kv_head_num = 3"),
    (("tensor_para_size", "4"), "tensor_para_size = 4 does not divide"),
    (("quant_policy", "2"), "quant_policy = 2 is not one of"),
    (("session_len", "0"), "session_len = 0 must be >= 1"),
    (("end_id", "1000"), "end_id = 1000 is outside vocab_size = 1000"),
    (("group_size", "128"), "group_size = 128 must be 0 when weight_type = fp16"),
    (("rope_scaling_type", "linear"), "rope_scaling_factor = 0.0 must be > 0"),
    (("rope_theta", "nan"), "rope_theta = nan must be a finite number"),
])
def test_validation_names_the_key_and_value(edit, message):
    key, value = edit
    lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in _cfg().to_ini().splitlines()]
    with pytest.raises(FormatError, match="^config.ini: " + message.replace("(", r"\(")):
        WorkspaceConfig.from_ini("\n".join(lines))


def test_missing_key_section_and_syntax_errors():
    text = _cfg().to_ini()
    with pytest.raises(FormatError, match="missing key inter_size"):
        WorkspaceConfig.from_ini("\n".join(l for l in text.splitlines() if not l.startswith("inter_size")))
    with pytest.raises(FormatError, match=r"missing the \[llama\] section"):
        WorkspaceConfig.from_ini("[other]\na = 1\n")
    with pytest.raises(FormatError, match="not a valid ini file"):
        WorkspaceConfig.from_ini("no section header")


@pytest.mark.parametrize("rows, group", [(64, 32), (576, 128), (100, 32), (1536, 64)])
def test_int4_quantize_dequantize_matches_float64_reference(rows, group):
    w = torch.randn(rows, 24)
    q = quantize_int4_rtn(w, group)
    padded = -(-rows // group) * group
    assert q["qweight"].shape == (padded // 8, 24) and q["scales"].shape == (padded // group, 24)
    # float64 reference of the documented formula, group by group
    codes = unpack_int4(q["qweight"]).double()
    s = q["scales"].double().repeat_interleave(group, 0)
    z = q["zeros"].double().repeat_interleave(group, 0)
    ref = ((codes - z) * s)[:rows]
    deq = dequantize_int4(q["qweight"], q["scales"], q["zeros"], rows, torch.float64)
    assert torch.allclose(deq, ref, atol=1e-6)
    assert (codes[rows:] == z[rows:]).all()  # padded rows dequantize to exact zeros
    # RTN error is at most half a step per element
    assert ((deq - w.double()).abs() <= s[:rows] / 2 + 1e-3).all()


def test_int4_plain_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8).reshape(16, 1).repeat(1, 3) % 16
    packed = pack_int4(codes)
    # nibble j of row i holds input row 8i + j
    assert packed[0, 0].item() == 0x76543210
    assert packed[1, 0].item() == int.from_bytes(bytes.fromhex("fedcba98"), "big") - 2**32
    assert torch.equal(unpack_int4(packed), codes)


def test_kv_scale_files_are_raw_little_endian_fp32(tmp_path):
    params = np.array([[0.5, -1.0, 0.25, 2.0], [1.5, 0.0, 0.125, -3.0]], dtype=np.float32)
    path = tmp_path / "layers.0.past_kv_scale.0.weight"
    write_kv_scales(path, params)
    assert path.read_bytes() == params.astype("<f4").tobytes() and path.stat().st_size == 32
    assert np.array_equal(read_kv_scales(path, 2), params)
    with pytest.raises(FormatError, match="32 bytes, expected 48"):
        read_kv_scales(path, 3)


def test_layout_classification():
    assert classify("weights/layers.12.2.safetensors") == (12, 2)
    assert classify("weights/layers.3.past_kv_scale.1.weight") == (3, 1)
    assert classify("weights/global.0.safetensors") == (None, 0)
    assert classify("tokenizer/tokenizer.json") == (None, None)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/path", "a/../../b", "", "a\\b", "./a"])
def test_manifest_refuses_unsafe_paths(bad):
    with pytest.raises(FormatError, match="unsafe file path"):
        check_relative_path(bad)
    body = {"format": "lmdepot.workspace", "format_version": 1, "provenance": {},
            "files": [{"path": bad, "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(FormatError):
        Manifest.from_json(json.dumps(body))


def test_manifest_rejects_newer_format_and_garbage():
    with pytest.raises(FormatError, match="newer than this lmdepot"):
        Manifest.from_json(json.dumps({"format": "lmdepot.workspace", "format_version": 99, "files": []}))
    with pytest.raises(FormatError, match="malformed manifest"):
        Manifest.from_json("[1, 2]")
