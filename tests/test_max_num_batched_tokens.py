"""--max-num-batched-tokens: reaches the engine from every command that builds one; bad values are one line.

A prompt longer than the budget is prefilled in chunks (no step computes more tokens than the budget)
and still gives the default budget's greedy tokens.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmdepot.cli import main
from lmdepot.runtime.scheduler import Scheduler

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = " ".join(f"w{5 + i % 150}" for i in range(40))   # 40 tokens of the tiny word-level vocabulary


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def ws(hf, tmp_path_factory):
    from lmdepot.convert.converter import ConvertOptions, convert_model

    dst = tmp_path_factory.mktemp("mnbt") / "ws"
    convert_model(str(hf), dst, ConvertOptions())
    return dst


@pytest.fixture
def step_sizes(monkeypatch):
    """The tokens each engine step computes (the scheduler's batches), recorded as the engine runs."""
    sizes = []
    schedule = Scheduler.schedule

    def recording(self):
        batch, doomed = schedule(self)
        if batch:
            sizes.append(sum(n for _, n in batch))
        return batch, doomed

    monkeypatch.setattr(Scheduler, "schedule", recording)
    return sizes


def _generate(ws, *extra):
    args = ["generate", str(ws), "--prompt", PROMPT, "--no-chat-template", "--temperature", "0",
            "--max-new-tokens", "6", "--device", "cpu", *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_generate_chunks_the_prompt_to_the_budget(ws, step_sizes):
    default = _generate(ws)
    assert step_sizes[0] == 40            # the default budget (2048) prefills the prompt in one step
    step_sizes.clear()
    assert _generate(ws, "--max-num-batched-tokens", "16") == default
    assert step_sizes[:3] == [16, 16, 8]  # 40 prompt tokens in chunks of the budget, then decodes
    assert max(step_sizes) == 16


def test_bench_throughput_runs_under_the_budget(hf, tmp_path, step_sizes):
    out = tmp_path / "t.json"
    r = CliRunner().invoke(main, ["bench", "throughput", "--model", str(hf), "--device", "cpu", "-n", "3",
                                  "--prompt", "20-30", "--output", "3", "--max-num-batched-tokens", "16",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["meta"]["max_num_batched_tokens"] == 16 and "step budget 16 tokens" in r.stdout
    assert result["engine"]["completed"] == 3 and result["engine"]["output_tokens"] == 9
    assert max(step_sizes) == 16


def test_bench_generation_records_the_budget(hf, tmp_path):
    out = tmp_path / "g.json"
    r = CliRunner().invoke(main, ["bench", "generation", "--model", str(hf), "--device", "cpu", "--concurrency", "2",
                                  "--cases", "20x2", "--max-num-batched-tokens", "16", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["meta"]["max_num_batched_tokens"] == 16
    assert result["rows"][0]["output_tokens"] == 4


def test_api_server_passes_the_budget(ws, monkeypatch):
    """The engine's keyword arguments (the server itself is not started: the seam stops before uvicorn)."""
    import lmdepot.runtime.llm as llm_mod

    seen = []

    class Stop(Exception):
        pass

    def fake(model, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(llm_mod, "AsyncLLM", fake)
    for extra in ([], ["--max-num-batched-tokens", "64"]):
        r = CliRunner().invoke(main, ["serve", "api_server", str(ws), *extra])
        assert isinstance(r.exception, Stop), r.output
    assert "max_num_batched_tokens" not in seen[0]   # not given: EngineConfig's default stays
    assert seen[1]["max_num_batched_tokens"] == 64


def test_bench_serving_starts_the_server_with_the_budget(monkeypatch, tmp_path):
    from lmdepot.bench import serving

    cmds = []

    class Stop(Exception):
        pass

    def popen(cmd, **kw):
        cmds.append(cmd)
        raise Stop

    monkeypatch.setattr(serving.subprocess, "Popen", popen)
    for budget in (None, 32):
        with pytest.raises(Stop):
            serving.start_server(tmp_path, "cpu", 1, 4, None, 0, "online", 8, tmp_path / "log",
                                 max_num_batched_tokens=budget)
    assert "--max-num-batched-tokens" not in cmds[0]
    i = cmds[1].index("--max-num-batched-tokens")
    assert cmds[1][i + 1] == "32"
    # the flag the bench passes is one `serve api_server` accepts
    from lmdepot.serve.cli import api_server

    assert "--max-num-batched-tokens" in {o for p in api_server.params for o in p.opts}


def test_bench_serving_with_url_rejects_the_budget():
    r = CliRunner().invoke(main, ["bench", "serving", "--url", "http://127.0.0.1:1", "--device", "cpu",
                                  "--max-num-batched-tokens", "64"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "keeps the budget" in r.stderr


@pytest.mark.parametrize("command", [["generate", "ws", "--prompt", "x"], ["chat", "ws"], ["serve", "api_server", "ws"],
                                     ["bench", "generation"], ["bench", "throughput"], ["bench", "serving"]])
@pytest.mark.parametrize("value", ["0", "-4", "15", "1.5", "many"])
def test_bad_budget_is_one_line(command, value):
    r = CliRunner().invoke(main, [*command, f"--max-num-batched-tokens={value}"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"error: --max-num-batched-tokens {value}: must be an integer of at"
                                             " least 16"], r.stderr
