"""Reference perplexity with HF transformers on the same windows (what the engine must match)."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def hf_perplexity(hf_dir, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """exp(mean -log p) over the windows' seqlen - 1 predicted tokens each, one full forward a window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    nll = 0.0
    for w in ids:
        logits = model(w[None]).logits[0, :-1].double()
        nll -= torch.log_softmax(logits, -1).gather(1, w[1:, None]).sum().item()
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))
