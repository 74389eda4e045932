"""AWQ: activation-aware scale search and weight clipping (Lin et al., 2023), on (in, out) weights.

A smoothing group is a set of linears reading the same input x (or a norm / linear producing it).
Scaling input channel c of those linears by s[c] and dividing x[c] by s[c] (folded into the
previous norm's weight or the previous linear's output columns) leaves the float output intact
but moves quantization error away from the channels with large activations.

Scale search: s = mean|x|^r for r in {0, 1/n, ..., (n-1)/n}, normalized so that max·min = 1; the
r whose fake-quantized block output is closest (MSE) to the float output wins. r = 0 is plain RTN,
so on the calibration tokens the search never does worse than RTN.
Clipping search: per group and output column, the range is shrunk to max|w|·(1 - k/n) for the k
whose group partial products x_g·w_g are closest to the unclipped float ones.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lmdepot.convert.quant_groups import _ungrouped, fake_quantize
from lmdepot.formats.int4 import QMAX, group_params, group_rows

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CLIP_COLUMNS = 1024  # bounds the (tokens, groups, columns) partial-product tensor


def normalized(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def fixed_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Without search (LMDeploy's smoothing): s = absmax(x)^α / absmax(w)^(1-α) per input channel."""
    w_absmax = torch.cat([w.abs() for w in weights], dim=1).amax(dim=1).clamp(min=1e-5)
    return normalized(x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha))


def search_scales(x_absmean: torch.Tensor, weights: Sequence[torch.Tensor], parts: Sequence[int], g: int,
                  block: Callable[[list[torch.Tensor]], torch.Tensor], reference: torch.Tensor,
                  n_grid: int = N_GRID) -> tuple[torch.Tensor, float, list[float]]:
    """Best scales for `weights` (each (in, out), split into `parts` row slices when quantized).

    `block(effective_weights)` returns the block output computed with those weights in place of the
    float ones; the effective weight of scales s is fake_quant(W·s) / s. Returns (s, ratio, errors).
    """
    errors, best = [], (float("inf"), None, 0.0)
    for k in range(n_grid):
        r = k / n_grid
        s = normalized(x_absmean.pow(r)) if k else torch.ones_like(x_absmean)
        eff = [fake_quantize(w * s[:, None], g, p) / s[:, None] for w, p in zip(weights, parts)]
        err = (block(eff) - reference).double().pow(2).mean().item()
        errors.append(err)
        if err < best[0]:
            best = (err, s, r)
    return best[1], best[2], errors


def _clip_chunk(wg: torch.Tensor, xg: torch.Tensor, n_grid: int, max_shrink: float) -> torch.Tensor:
    """wg (G, g, cols), xg (t, G, g) -> best clip bound (G, cols)."""
    ref = torch.einsum("tGi,Gic->tGc", xg, wg)
    bound0 = wg.abs().amax(dim=1)
    best_err = torch.full_like(bound0, float("inf"))
    best = bound0.clone()
    for k in range(int(max_shrink * n_grid)):
        bound = bound0 * (1 - k / n_grid)
        clipped = torch.maximum(torch.minimum(wg, bound[:, None]), -bound[:, None])
        scales, zeros = group_params(clipped)
        q = torch.round(clipped / scales[:, None] + zeros[:, None]).clamp(0, QMAX)
        deq = (q - zeros[:, None]) * scales[:, None]
        err = (torch.einsum("tGi,Gic->tGc", xg, deq) - ref).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, g: int, parts: int = 1, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """w (in, out) with its inputs x (tokens, in) -> w clamped to the best per-group bounds."""
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).long()]
    wg = group_rows(w.float(), g, parts)                              # (G, g, out)
    xg = group_rows(x.float().t().contiguous(), g, parts).permute(2, 0, 1)  # (t, G, g)
    bounds = torch.cat([_clip_chunk(wg[..., c:c + CLIP_COLUMNS], xg, n_grid, max_shrink)
                        for c in range(0, wg.shape[-1], CLIP_COLUMNS)], dim=-1)
    clipped = torch.maximum(torch.minimum(wg, bounds[:, None]), -bounds[:, None])
    return _ungrouped(clipped, w.shape[0], parts).to(w.dtype)
