"""GGUF -> dequantized HF checkpoint, cached in the user cache dir by the GGUF's sha256.

Loading a GGUF through transformers costs ~20 s on a laptop CPU; the cached safetensors
checkpoint loads in well under a second, and later conversions of the same file reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lmdepot.errors import ConvertError
from lmdepot.formats.manifest import sha256_file


def cache_dir() -> Path:
    root = os.environ.get("LMDEPOT_CACHE")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("lmdepot")
    return Path(root)


def hf_checkpoint_from_gguf(gguf: Path) -> tuple[Path, str]:
    """(HF checkpoint dir, sha256 of the GGUF file)."""
    digest = sha256_file(gguf)
    target = cache_dir() / "gguf" / digest
    if (target / "config.json").is_file():
        return target, digest
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        _dequantize(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is equally good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, digest


def _dequantize(gguf: Path, out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmdepot.formats.tensors import save_tensors

    hf_logging.set_verbosity_error()
    with tqdm(total=2, desc=f"dequantizing {gguf.name} (once; cached)", unit="step") as bar:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except ImportError as exc:
            raise ConvertError(f"reading GGUF needs the gguf and accelerate packages ({exc})") from None
        except Exception as exc:  # transformers raises many types for unreadable files
            raise ConvertError(f"{gguf}: cannot read as GGUF ({type(exc).__name__}: {exc})") from None
        bar.update()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v for k, v in model.state_dict().items()
                 if not (config.get("tie_word_embeddings") and k == "lm_head.weight")}
        save_tensors(out / "model.safetensors", {k: v.clone() for k, v in state.items()})
        tokenizer.save_pretrained(out)
        model.generation_config.to_json_file(out / "generation_config.json")
        bar.update()
