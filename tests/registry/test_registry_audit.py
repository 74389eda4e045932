"""diff and audit across versions: config keys, KV scales per layer/head, weights, provenance."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from regkit import make_workspace

from lmdepot.cli import main
from lmdepot.formats.layout import layer_file
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import load_tensors, save_tensors
from lmdepot.registry import Registry


@pytest.fixture
def three_versions(store_url, workspace, tmp_path):
    """v1; v2 = other session_len + shifted K scales; v3 = v2 with one tensor of one layer changed."""
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    ws2 = make_workspace(tmp_path / "v2", kv_shift=0.5, session_len=8192)
    Manifest.scan(ws2, provenance={"source": "synthetic", "seed": 0, "calib": "wikitext"}).write(ws2)
    reg.push(ws2, "tiny:v2", show_progress=False)
    t = load_tensors(ws2 / layer_file(1, 2))
    t["attention.wo.weight"] = t["attention.wo.weight"] + 0.25
    save_tensors(ws2 / layer_file(1, 2), t)
    Manifest.scan(ws2, provenance={"source": "synthetic", "seed": 0, "calib": "wikitext"}).write(ws2)
    reg.push(ws2, "tiny:v2", show_progress=False)
    return reg


def cli(*args):
    res = CliRunner().invoke(main, ["registry", *args])
    assert res.exit_code == 0, res.output
    return res.stdout


def test_diff_config_kv_weights_provenance(three_versions):
    reg = three_versions
    v2_first = reg.log("tiny", "v2")[0]["to"]
    d = json.loads(cli("diff", "tiny:v1", f"tiny@{v2_first}", "--json", "--top", "3"))
    assert d["config"]["changed"] == {"session_len": ["4096", "8192"]}
    assert d["config"]["added"] == {} and d["config"]["removed"] == {}
    kv = d["kv_scales"]
    assert kv["compared"] == 4 * 6 and kv["changed"] == 4 * 6  # only k_scale moved, on every head
    assert kv["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert kv["max_rel"] == pytest.approx(0.5 / 0.01, rel=1e-4)  # layer 0 head 0: 0.01 -> 0.51
    assert len(kv["top"]) == 3 and all(t["param"] == "k_scale" for t in kv["top"])
    assert d["weights"]["changed"] == [] and len(d["weights"]["unchanged"]) == 4 * 3 + 3
    assert d["provenance"]["added"] == {"calib": '"wikitext"'}
    text = cli("diff", "tiny:v1", f"tiny@{v2_first}")
    assert "~ session_len: 4096 -> 8192" in text and "k_scale" in text and "+ calib" in text


def test_diff_tensors_uses_ranged_reads(three_versions, monkeypatch):
    reg = three_versions
    v2_first = reg.log("tiny", "v2")[0]["to"]
    d = json.loads(cli("diff", f"tiny@{v2_first}", "tiny:v2", "--json", "--tensors"))
    assert d["weights"]["changed"] == [layer_file(1, 2)]
    assert d["config"] == {"added": {}, "removed": {}, "changed": {}} and d["kv_scales"]["changed"] == 0
    tens = d["tensors"][layer_file(1, 2)]
    assert list(tens) == ["attention.wo.weight"]
    assert tens["attention.wo.weight"]["max_abs"] == pytest.approx(0.25, abs=2e-3)  # fp16 rounding
    assert 0 < tens["attention.wo.weight"]["rel_norm"] < 1
    text = cli("diff", f"tiny@{v2_first}", "tiny:v2", "--tensors")
    assert "attention.wo.weight: max abs" in text and f"changed {layer_file(1, 2)}" in text


def test_registry_import_is_light():
    import subprocess

    code = "import sys, lmdepot.registry, lmdepot.registry.cli; print('torch' in sys.modules, 's3fs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_audit_table_and_plot(three_versions, tmp_path):
    rows = json.loads(cli("audit", "tiny", "--json"))
    assert len(rows) == 3
    assert rows[0]["tags"] == ["v1"] and rows[2]["tags"] == ["v2"] and rows[1]["tags"] == []
    assert rows[1]["config_changes"]["changed"] == {"session_len": ["4096", "8192"]}
    assert rows[2]["parent"] == rows[1]["digest"]
    assert rows[1]["kv"]["k_scale_mean"] - rows[0]["kv"]["k_scale_mean"] == pytest.approx(0.5, abs=1e-5)
    assert rows[0]["kv"]["per_layer"]["3"]["v_scale"] == pytest.approx(0.08 + 0.0005, abs=1e-5)
    text = cli("audit", "tiny")
    assert text.splitlines()[0].startswith("VERSION") and "session_len: 4096->8192" in text
    png = tmp_path / "kv.png"
    cli("audit", "tiny", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_plot_without_matplotlib(three_versions, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = CliRunner().invoke(main, ["registry", "audit", "tiny", "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "matplotlib" in res.stderr and "pip install" in res.stderr


def test_audit_unknown_name(store_url):
    res = CliRunner().invoke(main, ["registry", "audit", "nothing"])
    assert res.exit_code == 2 and "no versions" in res.stderr


def test_diff_weights_changed_by_digest(store_url, workspace, tmp_path):
    reg = Registry(store_url)
    reg.push(workspace, "tiny:v1", show_progress=False)
    ws = make_workspace(tmp_path / "other", seed=1)
    reg.push(ws, "tiny:seed1", show_progress=False)
    d = json.loads(cli("diff", "tiny:v1", "tiny:seed1", "--json"))
    assert len(d["weights"]["changed"]) == 4 * 3 + 3 and d["weights"]["unchanged"] == []
    assert d["provenance"]["changed"] == {"seed": ["0", "1"]}
    assert torch.__version__  # torch is needed only by --tensors, imported lazily
