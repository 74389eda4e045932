"""Random-weight checkpoints with published configs, and the workspaces the benches run on.

No hub access: the shapes below are copied from the models' published config.json files; weights
are random (speed does not depend on their values). `--layers` keeps the per-layer shape and cuts
the depth so a run fits a short device lease.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmdepot.bench.shapes import SHAPES
from lmdepot.bench.workload import BenchError


def word_tokenizer(dst: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering the vocabulary, so synthetic checkpoints convert like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(dst)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _internlm2_checkpoint(kw: dict, dst: Path) -> None:
    """InternLM2 has no transformers class (hub code only): write its tensors by name, one shard per layer.

    wqkv packs, per kv head, its q heads then k then v; with random weights only the shape matters.
    """
    from safetensors.torch import save_file

    dev, h, inter = _device(), kw["hidden_size"], kw["intermediate_size"]
    heads, kv = kw["num_attention_heads"], kw["num_key_value_heads"]
    d = h // heads

    def rnd(*shape):
        return (torch.randn(*shape, device=dev, dtype=torch.float16) * 0.02).cpu()

    index = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, dst / name, metadata={"format": "pt"})
        index.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.tok_embeddings.weight": rnd(kw["vocab_size"], h),
                                "model.norm.weight": torch.ones(h, dtype=torch.float16),
                                "output.weight": rnd(kw["vocab_size"], h)})
    for i in range(kw["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shard(f"layer{i:03d}.safetensors", {
            f"{p}.attention.wqkv.weight": rnd((heads + 2 * kv) * d, h), f"{p}.attention.wo.weight": rnd(h, heads * d),
            f"{p}.feed_forward.w1.weight": rnd(inter, h), f"{p}.feed_forward.w3.weight": rnd(inter, h),
            f"{p}.feed_forward.w2.weight": rnd(h, inter),
            f"{p}.attention_norm.weight": torch.ones(h, dtype=torch.float16),
            f"{p}.ffn_norm.weight": torch.ones(h, dtype=torch.float16)})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, "torch_dtype": "float16",
              **{k: v for k, v in kw.items() if k != "arch"}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def random_checkpoint(shape: str, dst: Path, layers: int | None = None) -> Path:
    """A random-weight fp16 HF checkpoint of SHAPE (on the GPU when there is one), with a word tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape]) | ({"num_hidden_layers": layers} if layers else {})
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    arch = kw.pop("arch")
    if arch == "internlm2":
        _internlm2_checkpoint(kw, dst)
    else:
        config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**kw, tie_word_embeddings=False,
                                                                  bos_token_id=1, eos_token_id=2)
        with torch.device(_device()):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(dst)
        del model
    word_tokenizer(dst, kw["vocab_size"])
    return dst


def convert(hf_dir: Path, dst: Path, int4: bool = False, tp: int = 1) -> Path:
    """fp16 workspace, or int4 (RTN, group 128: no calibration), split for tp ranks. RTN quantizes on the
    CPU (the quantizer's device only serves AWQ calibration), ~1-2 s per 7B layer on 16 cores."""
    from lmdepot.convert.converter import ConvertOptions, convert_model

    quantizer = None
    if int4:
        from lmdepot.convert.awq_quantizer import AwqQuantizer, QuantParams

        quantizer = AwqQuantizer(QuantParams("rtn", 4, 128), device=torch.device(_device()))
    convert_model(str(hf_dir), dst, ConvertOptions(tp=tp, dtype="fp16", quantizer=quantizer))
    return dst


def build(shape: str, dst: Path, layers: int | None = None, int4: bool = False, tp: int = 1,
          fp16: bool = True) -> dict:
    """`lmdepot bench model`: DST/hf, DST/fp16 and/or DST/int4 with the seconds of each phase."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise BenchError(f"--dst {dst}: exists and is not empty")
    times = {}
    t = time.perf_counter()
    random_checkpoint(shape, dst / "hf", layers)
    times["checkpoint_s"] = time.perf_counter() - t
    if fp16:
        t = time.perf_counter()
        convert(dst / "hf", dst / "fp16", tp=tp)
        times["convert_fp16_s"] = time.perf_counter() - t
    if int4:
        t = time.perf_counter()
        convert(dst / "hf", dst / "int4", int4=True, tp=tp)
        times["convert_int4_rtn_s"] = time.perf_counter() - t
    return {"shape": shape, "layers": layers or SHAPES[shape]["num_hidden_layers"], "tp": tp, "dst": str(dst),
            **times}


def is_workspace(path: Path) -> bool:
    return (Path(path) / "config.ini").is_file() or (Path(path) / "manifest.json").is_file()


def prepare(model: str | None, shape: str | None, layers: int | None, tmp: Path, int4: bool = False,
            hf: str | None = None, tp: int = 1) -> tuple[Path | None, Path]:
    """(HF dir or None, workspace) for `--model PATH` (an HF checkpoint is converted here; a workspace is
    used as is, its HF peer is `hf` if given) or `--shape NAME` (a random checkpoint built and converted here)."""
    if hf and not (Path(hf) / "config.json").is_file():
        raise BenchError(f"--hf {hf}: not an HF checkpoint (no config.json)")
    if model:
        path = Path(model)
        if not path.is_dir():
            raise BenchError(f"--model {model}: no such directory")
        if is_workspace(path):
            return (Path(hf) if hf else None), path
        if not (path / "config.json").is_file():
            raise BenchError(f"--model {model}: neither a workspace (config.ini) nor an HF checkpoint (config.json)")
        return path, convert(path, tmp / "ws", int4, tp)
    hf = random_checkpoint(shape, tmp / "hf", layers)
    return (None if SHAPES[shape]["arch"] == "internlm2" else hf), convert(hf, tmp / "ws", int4, tp)
