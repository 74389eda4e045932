"""The embedded default model end to end: convert with tp 1 and 3, inspect, verify, refuse tp 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.convert.source import builtin_gguf, open_source
from lmdepot.convert.tp import merge_layer
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import SafetensorsFile, load_tensors

REPO = Path(__file__).resolve().parents[1]


def test_tp3_workspace_layout_and_verify(smollm2_ws):
    ws = smollm2_ws[3]
    weights = sorted(p.name for p in (ws / "weights").iterdir())
    assert len([n for n in weights if n.startswith("layers.")]) == 90
    assert len([n for n in weights if n.startswith("global.")]) == 3
    assert {p.name for p in ws.iterdir()} == {"config.ini", "manifest.json", "tokenizer", "weights"}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in (ws / "tokenizer").iterdir()}
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert (cfg.num_layer, cfg.head_num, cfg.kv_head_num, cfg.tie_word_embeddings) == (30, 9, 3, 1)
    result = CliRunner().invoke(main, ["inspect", str(ws), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verify: OK, all 97 digests match" in result.output
    info = json.loads(CliRunner().invoke(main, ["inspect", str(ws), "--json"]).output)
    assert info["files"] == 97 and len(info["rank_bytes"]) == 3 and len(info["layer_bytes"]) == 30
    assert info["rank_bytes"][0] == info["rank_bytes"][1] == info["rank_bytes"][2]


def test_tp3_merges_back_to_the_tp1_workspace(smollm2_ws):
    one, three = smollm2_ws[1], smollm2_ws[3]
    cfg1 = WorkspaceConfig.read(one / "config.ini")
    cfg3 = WorkspaceConfig.read(three / "config.ini")
    for i in (0, 29):
        a = merge_layer([load_tensors(one / layout.layer_file(i, 0))], cfg1)
        b = merge_layer([load_tensors(three / layout.layer_file(i, r)) for r in range(3)], cfg3)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tp1_matches_the_dequantized_gguf_checkpoint(smollm2_ws):
    """Weights equal the cached dequantized checkpoint, rounded once to fp16."""
    hf = SafetensorsFile(open_source("smollm2-135m").hf_dir / "model.safetensors")
    ws = load_tensors(smollm2_ws[1] / layout.layer_file(7, 0))
    q = hf.get("model.layers.7.self_attn.q_proj.weight").to(torch.float16)
    assert torch.equal(ws[f"{layout.W_QKV}.weight"][:, :576], q.t())
    embed = load_tensors(smollm2_ws[1] / layout.global_file(0))[layout.TOK_EMBEDDINGS]
    assert torch.equal(embed, hf.get("model.embed_tokens.weight").to(torch.float16))


def test_second_conversion_gives_an_identical_manifest(smollm2_ws, tmp_path):
    result = CliRunner().invoke(main, ["convert", "smollm2-135m", "--tp", "3", "--dst-path", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ws" / "manifest.json").read_bytes() == (smollm2_ws[3] / "manifest.json").read_bytes()


def test_a_gguf_path_converts_like_the_builtin_name(smollm2_ws, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(builtin_gguf("smollm2-135m")), "--dst-path", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    a, b = Manifest.read(tmp_path / "w"), Manifest.read(smollm2_ws[1])
    differing = {e.path for e in a.files} ^ {e.path for e in b.files} | {
        e.path for e in a.files if e.sha256 != b.entry(e.path).sha256}
    assert differing == {"config.ini"}  # only model_name differs
    assert "model_name = SmolLM2-135M-Instruct.Q4_1" in (tmp_path / "w" / "config.ini").read_text()
    assert a.provenance["source"]["sha256"] == b.provenance["source"]["sha256"]


def test_tp2_is_refused_with_one_line_naming_the_heads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmdepot.cli", "convert", "smollm2-135m", "--tp", "2",
                           "--dst-path", str(tmp_path / "ws")], capture_output=True, text=True, cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --tp 2 does not divide the model's heads: head_num=9, kv_head_num=3, inter_size=1536;"
        " use --tp 1 or 3"]
    assert not (tmp_path / "ws").exists()


def test_verify_names_a_corrupt_or_missing_file(smollm2_ws, tmp_path):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(smollm2_ws[1], ws)
    target = ws / layout.layer_file(5, 0)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["inspect", str(ws), "--verify"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {target}: sha256 differs from the manifest (corrupt file)"
    target.unlink()
    result = CliRunner().invoke(main, ["inspect", str(ws), "--verify"])
    assert result.output.strip() == f"error: {target}: missing (listed in the manifest)"
    assert CliRunner().invoke(main, ["inspect", str(tmp_path)]).output.startswith("error: ")
