"""`lmdepot lite report`: the fidelity ladder of one model, engine against engine.

Rungs (LMDeploy's best-practice seeds): fp16; fp16 + KV int8 / int4; W4A16 RTN and AWQ at each
group size; W4A16 AWQ (first group size) + KV int8 / int4; W8A8 SmoothQuant (alpha 0.5) alone and
+ KV int8. One extra rung, fp16 + KV int4 with
LMDeploy's plain per-head scheme, shows what the default int4 scheme buys. Every rung is measured
with `eval.ppl.perplexity` on the same held-out windows; Δ is relative to the fp16 engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmdepot.eval.ppl import PYDOC_EVAL, eval_text, perplexity, windows


@dataclass
class Rung:
    name: str
    workspace: str          # key into the built workspaces
    quant_policy: int = 0
    kv: dict = field(default_factory=dict)   # extra EngineConfig KV knobs
    ppl: float = float("nan")
    weight_bytes: int = 0
    kv_bytes: int = 0       # per token, all layers and kv heads (float cache counted as fp16)
    tokens_per_s: float | None = None


def rungs(group_sizes: list[int]) -> list[Rung]:
    g0 = group_sizes[0]
    out = [Rung("fp16", "fp16"), Rung("fp16 + KV int8", "fp16", 8), Rung("fp16 + KV int4", "fp16", 4),
           Rung("fp16 + KV int4 (rotated per-token)", "fp16", 4, {"kv_scheme": "rotate"}),
           Rung("fp16 + KV int4 (plain per-head)", "fp16", 4, {"kv_scheme": "plain"})]
    for g in group_sizes:
        out += [Rung(f"W4A16 RTN g{g}", f"rtn-g{g}"), Rung(f"W4A16 AWQ g{g}", f"awq-g{g}")]
    out += [Rung(f"W4A16 AWQ g{g0} + KV int8", f"awq-g{g0}", 8), Rung(f"W4A16 AWQ g{g0} + KV int4", f"awq-g{g0}", 4)]
    out += [Rung("W8A8 SmoothQuant", "w8a8"), Rung("W8A8 SmoothQuant + KV int8", "w8a8", 8)]
    return out


def build_workspaces(model: str, work_dir: Path, group_sizes: list[int], calib, search_scale: bool,
                     device=None) -> dict[str, Path]:
    """fp16, rtn-g{g}, awq-g{g}, w8a8 workspaces under work_dir; ones already complete are reused."""
    from lmdepot.convert.awq_quantizer import AwqQuantizer, QuantParams
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from lmdepot.convert.smooth_quant import SmoothQuantizer

    plan = {"fp16": None}
    for g in group_sizes:
        plan[f"rtn-g{g}"] = QuantParams("rtn", 4, g, False, calib)
        plan[f"awq-g{g}"] = QuantParams("awq", 4, g, search_scale, calib)
    plan["w8a8"] = "smooth_quant"
    out = {}
    for name, params in plan.items():
        dst = work_dir / name
        if not (dst / "manifest.json").is_file():
            if params == "smooth_quant":
                quantizer = SmoothQuantizer(calib, device=device)
            else:
                quantizer = None if params is None else AwqQuantizer(params.check(), device=device)
            print(f"[report] building {name} in {dst}", file=sys.stderr)
            convert_model(model, dst, ConvertOptions(quantizer=quantizer, force=True))
        out[name] = dst
    return out


def weight_bytes(ws: Path) -> int:
    from lmdepot.formats.manifest import Manifest

    return sum(e.size for e in Manifest.read(ws).files if e.path.endswith(".safetensors"))


def kv_bytes_per_token(ws: Path, quant_policy: int, kv: dict) -> int:
    from lmdepot.formats import layout
    from lmdepot.formats.config import WorkspaceConfig
    from lmdepot.runtime.kv_cache import make_spec

    cfg = WorkspaceConfig.read(ws / layout.CONFIG_FILE)
    spec = make_spec(quant_policy, torch.float16, cfg.size_per_head, kv.get("kv_scales", "online"),
                     kv.get("kv_group_size"), kv.get("kv_rotate"), kv.get("kv_scheme"))
    # the channel scheme's per-block key params, spread over the workspace's block size
    return round(cfg.num_layer * spec.token_bytes(cfg.kv_head_num, cfg.size_per_head, cfg.cache_block_seq_len))


def run_ladder(built: dict[str, Path], ladder: list[Rung], text: str = PYDOC_EVAL, seqlen: int = 1024,
               samples: int | None = 4, chunk: int = 256, device: str = "cpu") -> list[Rung]:
    from lmdepot.runtime.config import EngineConfig
    from lmdepot.runtime.engine import Engine

    ids = None
    for r in ladder:
        ws = built[r.workspace]
        engine = Engine(str(ws), EngineConfig(quant_policy=r.quant_policy, quiet=True, device=device,
                                              enable_prefix_caching=False, max_batch_size=1, **r.kv))
        try:
            if ids is None:
                ids = windows(engine.tokenizer(eval_text(text), add_special_tokens=False)["input_ids"],
                              seqlen, samples)
            res = perplexity(engine.runner, ids, chunk)
        finally:
            engine.close()
        r.ppl, r.weight_bytes = res.ppl, weight_bytes(ws)
        r.kv_bytes = kv_bytes_per_token(ws, r.quant_policy, r.kv)
        r.tokens_per_s = res.tokens_per_s if device.startswith("cuda") else None
        print(f"[report] {r.name}: ppl {r.ppl:.4f} ({res.seconds:.0f} s)", file=sys.stderr)
    return ladder


def format_table(ladder: list[Rung], hf_ppl: float | None = None) -> str:
    base = ladder[0].ppl
    lines = ["| rung | perplexity | Δ vs fp16 | weight bytes | KV bytes/token | tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    if hf_ppl is not None:
        lines.append(f"| HF transformers (fp32, dequantized model) | {hf_ppl:.4f} | {100 * (hf_ppl / base - 1):+.3f}% "
                     "| | | |")
    for r in ladder:
        tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}"
        lines.append(f"| {r.name} | {r.ppl:.4f} | {100 * (r.ppl / base - 1):+.3f}% | {r.weight_bytes:,} "
                     f"| {r.kv_bytes:,} | {tps} |")
    return "\n".join(lines) + "\n"
