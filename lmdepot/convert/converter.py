"""HF checkpoint -> workspace, one decoder layer at a time."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from lmdepot import __version__
from lmdepot.convert.arch import adapter_for, architecture_of, model_keys
from lmdepot.convert.linear import TORCH_DTYPES
from lmdepot.convert.source import TOKENIZER_FILES, Source, open_source
from lmdepot.convert.tp import check_int4_tp, check_tp, split_layer, split_vocab
from lmdepot.errors import ConvertError
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import save_tensors


@dataclass
class ConvertOptions:
    tp: int = 1
    dtype: str = "fp16"
    model_name: str | None = None
    model_format: str = "hf"
    allow_pickle: bool = False
    force: bool = False
    session_len: int | None = None
    # Optional hook that quantizes while converting (`lite auto_awq`): an object with
    #   group_size: int, provenance: dict,
    #   begin(src, cfg)                        before the first layer,
    #   layer(i, LayerTensors) -> LayerTensors called for i = 0, 1, ... in order (e.g. AWQ smoothing),
    #   linear(Linear) -> Linear               float slice of one rank -> int4 (groups per rank slice),
    #                                          or any object with .tensors(prefix, dtype) (int8),
    #   weight_type: str (optional)            "int4" when absent,
    #   end()                                  after the last layer.
    quantizer: object | None = None


def build_config(src: Source, opts: ConvertOptions) -> WorkspaceConfig:
    arch = architecture_of(src.config)
    keys = model_keys(src.config, arch)
    quant = src.config.get("quantization_config") or {}
    if opts.model_format == "awq":
        if quant.get("quant_method") != "awq" or int(quant.get("bits", quant.get("w_bit", 4))) != 4:
            raise ConvertError(f"{src.hf_dir}: --model-format awq needs a 4-bit AutoAWQ checkpoint"
                               f" (quantization_config.quant_method = {quant.get('quant_method')!r})")
        keys.update(weight_type="int4", group_size=int(quant.get("group_size", quant.get("q_group_size", 128))))
    elif quant:
        raise ConvertError(f"{src.hf_dir}: the checkpoint is quantized ({quant.get('quant_method')});"
                           " pass --model-format awq for AutoAWQ checkpoints")
    elif opts.quantizer is not None:
        # int4 (auto_awq) unless the quantizer says otherwise (smooth_quant: int8, group_size 0).
        keys.update(weight_type=getattr(opts.quantizer, "weight_type", "int4"), group_size=opts.quantizer.group_size)
    else:
        keys["weight_type"] = opts.dtype
    name = opts.model_name or src.name.removesuffix(".gguf")
    cfg = WorkspaceConfig(model_name=name, **keys)
    cfg.session_len = opts.session_len or min(cfg.max_position_embeddings, 4096)
    check_tp(cfg, opts.tp)
    cfg.tensor_para_size = opts.tp
    if cfg.weight_type == "int4" and opts.quantizer is None:
        check_int4_tp(cfg, cfg.group_size)
    return cfg.validate()


def _check_tensors(src: Source, cfg: WorkspaceConfig, opts: ConvertOptions) -> None:
    """Fail before writing anything when a tensor the workspace needs is absent."""
    adapter = adapter_for(cfg.model_arch, asdict(cfg))
    suffix = "qweight" if opts.model_format == "awq" else "weight"
    needed = [adapter.embed, adapter.norm] + ([] if cfg.tie_word_embeddings else [adapter.lm_head])
    for i in range(cfg.num_layer):
        needed += [f"{p}.{suffix}" for p in adapter.linear_prefixes(i).values()]
        needed += list(adapter.norm_names(i))
    missing = [n for n in needed if not src.has(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{src.hf_dir}: missing tensor {missing[0]}{more}")


def _prepare_dst(dst: Path, force: bool) -> bool:
    """Returns whether dst was created by us. Only files of a previous workspace are ever removed."""
    if not dst.exists():
        dst.mkdir(parents=True)
        return True
    if not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    entries = list(dst.iterdir())
    if not entries:
        return False
    if not force:
        raise ConvertError(f"{dst}: directory is not empty; pass --force to overwrite a previous workspace there")
    if not (dst / layout.MANIFEST_FILE).is_file():
        raise ConvertError(f"{dst}: not empty and holds no workspace; refusing to write into it even with --force")
    old = Manifest.read(dst)
    listed = {e.path for e in old.files} | {layout.MANIFEST_FILE}
    foreign = [p for p in dst.rglob("*") if p.is_file() and p.relative_to(dst).as_posix() not in listed]
    if foreign:
        raise ConvertError(f"{foreign[0]}: not part of the previous workspace; refusing to overwrite {dst}")
    for path in sorted(listed):
        (dst / path).unlink(missing_ok=True)
    for sub in (layout.TOKENIZER_DIR, layout.WEIGHTS_DIR):
        if (dst / sub).is_dir() and not any((dst / sub).iterdir()):
            (dst / sub).rmdir()
    return False


def _write_tokenizer(src: Source, dst: Path, cfg: WorkspaceConfig) -> None:
    tok_dir = dst / layout.TOKENIZER_DIR
    tok_dir.mkdir()
    if not (src.hf_dir / "tokenizer.json").is_file() and not (src.hf_dir / "tokenizer.model").is_file():
        raise ConvertError(f"{src.hf_dir}: no tokenizer.json or tokenizer.model")
    for name in TOKENIZER_FILES:
        if (src.hf_dir / name).is_file() and name != "chat_template.jinja":
            shutil.copyfile(src.hf_dir / name, tok_dir / name)
    # The chat template lives inside tokenizer_config.json, whichever file the source kept it in.
    tc_path = tok_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    jinja = src.hf_dir / "chat_template.jinja"
    if "chat_template" not in tc and jinja.is_file():
        tc["chat_template"] = jinja.read_text()
        tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    gen = tok_dir / "generation_config.json"
    if not gen.is_file():
        gen.write_text(json.dumps({"bos_token_id": cfg.start_id, "eos_token_id": cfg.end_id}, indent=2) + "\n")


def convert_model(source: str, dst_path: str | Path, opts: ConvertOptions) -> Manifest:
    src = open_source(source, allow_pickle=opts.allow_pickle)
    cfg = build_config(src, opts)
    _check_tensors(src, cfg, opts)
    dst = Path(dst_path)
    created = _prepare_dst(dst, opts.force)
    written: list[Path] = []
    try:
        (dst / layout.WEIGHTS_DIR).mkdir(exist_ok=True)
        _write_weights(src, cfg, dst, opts, written)
        _write_tokenizer(src, dst, cfg)
        cfg.write(dst / layout.CONFIG_FILE)
        provenance = {
            "lmdepot_version": __version__,
            "source": {"kind": src.kind, "name": src.name, "sha256": src.digest},
            "options": {"tp": opts.tp, "dtype": opts.dtype, "model_format": opts.model_format},
        }
        if opts.quantizer is not None:
            provenance["quantization"] = opts.quantizer.provenance
        manifest = Manifest.scan(dst, provenance)
        manifest.write(dst)
        return manifest
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for p in written:
                p.unlink(missing_ok=True)
            shutil.rmtree(dst / layout.TOKENIZER_DIR, ignore_errors=True)
            for name in (layout.CONFIG_FILE, layout.MANIFEST_FILE):
                (dst / name).unlink(missing_ok=True)
        raise


def _write_weights(src: Source, cfg: WorkspaceConfig, dst: Path, opts: ConvertOptions, written: list[Path]):
    adapter = adapter_for(cfg.model_arch, asdict(cfg))
    dtype = "fp16" if cfg.weight_type in ("int4", "int8") else cfg.weight_type
    tp = cfg.tensor_para_size
    quantizer = opts.quantizer
    if quantizer is not None:
        quantizer.begin(src, cfg)
    verb = "quantizing" if quantizer is not None else "converting"
    for i in tqdm(range(cfg.num_layer), desc=f"{verb} {cfg.model_name} (tp={tp})", unit="layer"):
        layer = adapter.layer(i, src.get, src.get_linear)
        if quantizer is not None:
            layer = quantizer.layer(i, layer)
        for rank in range(tp):
            path = dst / layout.layer_file(i, rank)
            written.append(path)
            save_tensors(path, split_layer(layer, cfg, rank, dtype, quantizer.linear if quantizer else None))
        del layer
    if quantizer is not None:
        quantizer.end()
    embed = src.get(adapter.embed)
    norm = src.get(adapter.norm)
    lm_head = None if cfg.tie_word_embeddings else src.get(adapter.lm_head)
    torch_dtype = TORCH_DTYPES[dtype]
    for rank in range(tp):
        tensors = {layout.TOK_EMBEDDINGS: split_vocab(embed, cfg, rank).to(torch_dtype),
                   layout.FINAL_NORM: norm.to(torch_dtype)}
        if lm_head is not None:
            tensors[layout.LM_HEAD] = split_vocab(lm_head, cfg, rank).to(torch_dtype)
        path = dst / layout.global_file(rank)
        written.append(path)
        save_tensors(path, tensors)
