import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter has no bf16 arithmetic on CPU; fp16 and fp32 cover the kernels' logic there.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    from lmdepot.runtime.kernels import scratch

    monkeypatch.setattr(scratch, "POISON", True)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)


def graph_replays(launch, inputs, check, replays: int = 3) -> None:
    """Run `launch` once (compile, allocate), capture it in a CUDA graph, then `replays` times: new
    random values into each tensor of `inputs`, replay, `check(outputs the captured launch returned)`
    (GPU only)."""
    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = launch()
    for _ in range(replays):
        for x in inputs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(outs)
