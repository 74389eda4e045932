import json

import torch
from click.testing import CliRunner

from lmdepot.cli import main


def test_check_env_reports_versions_registry_and_extras(monkeypatch, tmp_path):
    monkeypatch.setenv("LMDEPOT_REGISTRY", f"file://{tmp_path}/reg")
    result = CliRunner().invoke(main, ["check_env"])
    assert result.exit_code == 0, result.output
    assert f"torch            {torch.__version__}" in result.output
    assert f"registry         file://{tmp_path}/reg" in result.output
    assert "env              LMDEPOT_REGISTRY=" in result.output
    info = json.loads(CliRunner().invoke(main, ["check_env", "--json"]).output)
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["extras"]) == {"gpu", "serve", "s3", "plot"}
    assert info["gloo"] is True



def test_list_shows_architectures_formats_and_registry_names(tiny_checkpoint, tmp_path):
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from lmdepot.registry import Registry

    url = f"file://{tmp_path}/reg"
    ws = tmp_path / "ws"
    convert_model(str(tiny_checkpoint("qwen2")), ws, ConvertOptions())
    Registry(url).push(ws, "tiny-qwen2:v1")
    result = CliRunner().invoke(main, ["list", "--registry", url])
    assert result.exit_code == 0, result.output
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM"):
        assert f"  {arch}\n" in result.output
    assert "internlm2 (<|action_start|><|plugin|>)" in result.output
    assert result.output.endswith(f"registry {url}: 1 name(s)\n  tiny-qwen2\tv1\n")
