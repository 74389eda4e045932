"""CPU-correct inference runtime for lmdepot workspaces. See docs/runtime.md.

Names load lazily so that `lmdepot --help` and the CLI start without importing torch.
"""

_EXPORTS = {"LLM": "llm", "AsyncLLM": "llm", "Completion": "llm", "Engine": "engine",
            "EngineConfig": "config", "SamplingParams": "sequence"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"lmdepot.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
