"""Bad input gives one clear `error:` line and exit status 2, never a traceback or a silent fallback."""

import shutil

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.formats.manifest import Manifest


def run(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert r.exit_code == 2, (r.output, r.exception)
    # the KV sizing report may come first; the error is one line, last, with no traceback
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("[lmdepot]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def ws_copy(tiny, tmp_path):
    _, ws = tiny("llama")
    dst = tmp_path / "ws"
    shutil.copytree(ws, dst)
    return dst


ARGS = ["--prompt", "w5 w6", "--no-chat-template", "--max-new-tokens", "2", "--cache-max-entry-count", "0.01"]


def test_missing_file_is_named(ws_copy):
    (ws_copy / "weights/layers.1.0.safetensors").unlink()
    assert "weights/layers.1.0.safetensors: missing" in run("generate", ws_copy, *ARGS)


def test_corrupt_file_is_named(ws_copy):
    path = ws_copy / "weights/layers.2.0.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    msg = run("generate", ws_copy, *ARGS)
    assert "weights/layers.2.0.safetensors" in msg and "corrupt" in msg


def test_config_inconsistent_with_weights(ws_copy):
    ini = ws_copy / "config.ini"
    ini.write_text(ini.read_text().replace("inter_size = 96", "inter_size = 128"))
    Manifest.scan(ws_copy, Manifest.read(ws_copy).provenance).write(ws_copy)  # digests stay valid
    msg = run("generate", ws_copy, *ARGS)
    assert "feed_forward.w1.weight" in msg and "inconsistent" in msg


def test_prompt_longer_than_session_len(ws_copy):
    msg = run("generate", ws_copy, "--session-len", "4", "--prompt", "w5 w6 w7 w8 w9 w10", "--no-chat-template",
              "--cache-max-entry-count", "0.01")
    assert "prompt of" in msg and "does not fit session_len = 4" in msg


def test_tp_differs_from_workspace(ws_copy):
    msg = run("generate", ws_copy, "--tp", "2", *ARGS)
    assert "--tp 2" in msg and "tensor_para_size = 1" in msg


def test_unknown_registry_tag(tmp_path):
    msg = run("generate", "nosuchmodel:v9", *ARGS, env={"LMDEPOT_REGISTRY": f"file://{tmp_path}/reg"})
    assert "nosuchmodel:v9" in msg


def test_kv_quant_policy_not_in_0_4_8(ws_copy):
    assert "--quant-policy 3 is not one of 0, 4, 8" in run("generate", ws_copy, "--quant-policy", "3", *ARGS)


def test_static_kv_scales_without_files(ws_copy):
    msg = run("generate", ws_copy, "--quant-policy", "8", "--kv-scales", "static", *ARGS)
    assert "no KV scale files" in msg and "past_kv_scale" in msg


def test_chat_rejects_wrong_tp_too(ws_copy):
    assert "tensor_para_size = 1" in run("chat", ws_copy, "--tp", "2")
