"""Session-scoped servers: SmolLM2-135M (the embedded default) for behaviour, a tiny random model for load."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serve.helpers import Server  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ws(tmp_path_factory):
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from tests.tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("serve-tiny")
    hf = make_tiny_checkpoint(root / "hf", "llama")
    convert_model(str(hf), root / "ws", ConvertOptions(tp=1))
    return root / "ws"


@pytest.fixture(scope="session")
def smol_server(smollm2_ws, tmp_path_factory):
    """The embedded default served by registry tag, as in the seeds: `api_server smollm2-135m:latest`."""
    from lmdepot.registry import Registry

    root = tmp_path_factory.mktemp("serve-registry")
    url = f"file://{root}/registry"
    Registry(url).push(smollm2_ws[1], "smollm2-135m:latest", show_progress=False)
    server = Server("api_server", "smollm2-135m:latest", "--session-len", "1024", "--log-level", "warning",
                    extra_env={"LMDEPOT_REGISTRY": url, "LMDEPOT_CACHE": str(root / "cache")})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_ws):
    server = Server("api_server", tiny_ws, "--model-name", "tiny", "--max-batch-size", "64", "--log-level", "warning")
    yield server
    server.stop()
