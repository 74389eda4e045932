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
