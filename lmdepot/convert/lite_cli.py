"""`lmdepot lite`: offline quantization (calibration statistics, AWQ/RTN int4 weights, W8A8, KV scales).

Options are validated here rather than with click.Choice so that every bad value is reported as
one `error: ...` line, like every other user error.
"""

from __future__ import annotations

import click

from lmdepot.convert.calib_data import PYDOC, CalibParams, parse_samples
from lmdepot.errors import ConvertError

_calib_options = [
    click.option("--calib-dataset", default=PYDOC, show_default=True,
                 help="'pydoc' (embedded Python docs, calibration part) or a .txt / .jsonl ({\"text\": ...}) file."),
    click.option("--calib-samples", default="128", show_default=True,
                 help="Number of token windows, or 'auto' (as many as the text holds, at most 128)."),
    click.option("--calib-seqlen", default=2048, show_default=True, type=int, help="Tokens per window."),
    click.option("--device", default=None, help="torch device (default: cuda if available, else cpu)."),
]


def calib_options(fn):
    for opt in reversed(_calib_options):
        fn = opt(fn)
    return fn


def _workspace_options(fn):
    """Where and how a quantizing command writes its workspace."""
    options = [
        click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor-parallel ranks."),
        click.option("--dst-path", required=True, type=click.Path(file_okay=False),
                     help="Workspace directory to write."),
        click.option("--work-dir", default=None, type=click.Path(file_okay=False),
                     help="Also store the calibration statistics there (for kv_qparams)."),
        click.option("--model-name", default=None, help="model_name in config.ini (default: from the source)."),
        click.option("--force", is_flag=True,
                     help="Write into a non-empty dst (only files lmdepot writes are replaced)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _params(dataset, samples, seqlen) -> CalibParams:
    return CalibParams(dataset, parse_samples(samples), seqlen)


def _device(name):
    import torch

    if name is None:
        return None
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConvertError(f"--device {name}: not a torch device") from None


@click.group()
def lite():
    """Offline quantization: calibration statistics, int4 AWQ/RTN weights, W8A8 SmoothQuant, KV-cache scales."""
    import warnings

    # Warnings (e.g. a calibration text shrunk by --calib-samples auto) read as one plain line.
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


@lite.command()
@click.argument("model")
@calib_options
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the statistics (written as WORK_DIR/stats.zarr).")
def calibrate(model, calib_dataset, calib_samples, calib_seqlen, device, work_dir):
    """Collect per-layer activation and KV statistics of MODEL (HF dir, GGUF or built-in name)."""
    from lmdepot.convert.calibrate import calibrate as run

    path = run(model, work_dir, _params(calib_dataset, calib_samples, calib_seqlen), _device(device))
    click.echo(f"wrote {path}")


@lite.command("auto_awq")
@click.argument("model")
@click.option("--w-bits", default=4, show_default=True, type=int, help="Weight bits (only 4).")
@click.option("--w-group-size", default=128, show_default=True, type=int, help="Group size: 32, 64, 128 or 256.")
@click.option("--method", default="awq", show_default=True, help="awq (activation-aware) or rtn (round to nearest).")
@click.option("--search-scale", is_flag=True,
              help="Search AWQ scales (ratio grid of 20, block-output MSE) and weight clipping;"
                   " without it scales use a fixed ratio of 0.5 on the activations' absmax.")
@click.option("--search-tokens", default=4096, show_default=True, type=click.IntRange(1),
              help="Calibration tokens (whole samples) the searches measure errors on.")
@calib_options
@_workspace_options
def auto_awq(model, w_bits, w_group_size, method, search_scale, search_tokens, calib_dataset, calib_samples,
             calib_seqlen, device, tp, dst_path, work_dir, model_name, force):
    """Quantize MODEL's linear weights to int4 and write an int4 workspace."""
    from lmdepot.convert.awq_quantizer import AwqQuantizer, QuantParams
    from lmdepot.convert.converter import ConvertOptions, convert_model

    params = QuantParams(method, w_bits, w_group_size, search_scale,
                         _params(calib_dataset, calib_samples, calib_seqlen), search_tokens)
    quantizer = AwqQuantizer(params, device=_device(device), stats_dir=work_dir)
    opts = ConvertOptions(tp=tp, model_name=model_name, force=force, quantizer=quantizer)
    manifest = convert_model(model, dst_path, opts)
    click.echo(f"wrote {dst_path}: int4 g{w_group_size} ({method}), {len(manifest.files)} files, "
               f"manifest sha256:{manifest.digest}")


@lite.command("smooth_quant")
@click.argument("model")
@click.option("--alpha", default=0.5, show_default=True, type=float,
              help="Migration strength: s = absmax(x)^alpha / absmax(w)^(1-alpha), between 0 and 1.")
@calib_options
@_workspace_options
def smooth_quant(model, alpha, calib_dataset, calib_samples, calib_seqlen, device, tp, dst_path, work_dir,
                 model_name, force):
    """W8A8: calibrate MODEL, smooth activations into weights, write an int8 (weight_type = int8) workspace."""
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from lmdepot.convert.smooth_quant import SmoothQuantizer

    quantizer = SmoothQuantizer(_params(calib_dataset, calib_samples, calib_seqlen), alpha, _device(device), work_dir)
    opts = ConvertOptions(tp=tp, model_name=model_name, force=force, quantizer=quantizer)
    manifest = convert_model(model, dst_path, opts)
    click.echo(f"wrote {dst_path}: W8A8 int8 (SmoothQuant, alpha {alpha}), {len(manifest.files)} files, "
               f"manifest sha256:{manifest.digest}")


@lite.command("kv_qparams")
@click.argument("calib_dir", type=click.Path(file_okay=False))
@click.argument("workspace", type=click.Path(file_okay=False))
@click.option("--kv-bits", default=8, show_default=True, type=int, help="KV-cache bits: 8 or 4.")
@click.option("--kv-sym", is_flag=True, help="Symmetric scales (zero = 0) instead of asymmetric ones.")
@click.option("--tp", default=None, type=int,
              help="Expected tensor-parallel size; must equal the workspace's (which decides the split).")
def kv_qparams(calib_dir, workspace, kv_bits, kv_sym, tp):
    """Write per-head KV-cache scales from CALIB_DIR into WORKSPACE and update its manifest."""
    from lmdepot.convert.kv_qparams import kv_qparams as run

    manifest = run(calib_dir, workspace, kv_bits, kv_sym, tp)
    click.echo(f"wrote kv scales ({kv_bits}-bit, {'sym' if kv_sym else 'asym'}) into {workspace},"
               f" manifest sha256:{manifest.digest}")


@lite.command("report")
@click.argument("model")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Where the fp16, RTN, AWQ and W8A8 workspaces are written (complete ones are reused).")
@click.option("--w-group-size", "group_sizes", default="128", show_default=True,
              help="Comma-separated weight group sizes for the RTN/AWQ rungs; KV rungs use the first.")
@click.option("--search-scale", is_flag=True, help="AWQ rungs with the scale and clipping search.")
@click.option("--text", default="pydoc-eval", show_default=True,
              help="Evaluation text: 'pydoc-eval' (never used for calibration) or a UTF-8 file.")
@click.option("--seqlen", default=1024, show_default=True, type=click.IntRange(2), help="Tokens per window.")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(1), help="Windows evaluated per rung.")
@click.option("--chunk", default=256, show_default=True, type=click.IntRange(1), help="Prefill chunk of the engine.")
@click.option("--hf-reference", is_flag=True, help="Add HF transformers' fp32 perplexity of the source model.")
@calib_options
def report(model, work_dir, group_sizes, search_scale, text, seqlen, samples, chunk, hf_reference, calib_dataset,
           calib_samples, calib_seqlen, device):
    """Fidelity ladder of MODEL: fp16, KV int8/int4, W4A16 RTN/AWQ, AWQ + KV, W8A8; prints a markdown table."""
    from pathlib import Path

    import torch

    from lmdepot.eval.report import build_workspaces, format_table, rungs, run_ladder

    try:
        sizes = [int(g) for g in group_sizes.split(",")]
    except ValueError:
        raise ConvertError(f"--w-group-size {group_sizes}: expected comma-separated integers") from None
    run_device = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    built = build_workspaces(model, Path(work_dir), sizes, _params(calib_dataset, calib_samples, calib_seqlen),
                             search_scale, _device(device))
    ladder = run_ladder(built, rungs(sizes), text, seqlen, samples, chunk, run_device)
    hf = None
    if hf_reference:
        from lmdepot.convert.source import open_source
        from lmdepot.eval.hf_ppl import hf_perplexity
        from lmdepot.eval.ppl import eval_text, windows
        from lmdepot.runtime.engine import load_tokenizer

        tok = load_tokenizer(built["fp16"])
        ids = windows(tok(eval_text(text), add_special_tokens=False)["input_ids"], seqlen, samples)
        hf = hf_perplexity(open_source(model).hf_dir, ids)
    click.echo(f"{model}: {samples} x {seqlen} tokens of {text}, prefill chunk {chunk}, device {run_device}\n")
    click.echo(format_table(ladder, hf), nl=False)
