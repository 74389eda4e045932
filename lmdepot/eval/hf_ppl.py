"""Reference perplexity with HF transformers on the same windows (what the engine must match)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


@torch.inference_mode()
def hf_perplexity(model, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """exp(mean -log p) over the windows' seqlen - 1 predicted tokens each, one full forward a window.
    `model`: an HF checkpoint directory or an already loaded causal LM."""
    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).eval()
    nll = 0.0
    for w in ids:
        logits = model(w[None]).logits[0, :-1].double()
        nll -= torch.log_softmax(logits, -1).gather(1, w[1:, None]).sum().item()
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))
