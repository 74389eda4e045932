"""HF -> workspace conversion: exact TP round trip per architecture, determinism, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lmdepot.cli import main
from lmdepot.convert.converter import ConvertOptions, convert_model
from lmdepot.convert.tp import merge_layer
from lmdepot.formats import layout
from lmdepot.formats.config import WorkspaceConfig
from lmdepot.formats.manifest import Manifest
from lmdepot.formats.tensors import load_tensors
from tests.tiny_models import ARCHS


def _hf_state(hf_dir: Path, arch: str) -> tuple[dict, dict]:
    """(config.json, state dict in Llama naming) of a tiny checkpoint."""
    if arch == "internlm2":
        hf_dir = hf_dir / "reference"
    sd = load_file(hf_dir / "model.safetensors")
    return json.loads((hf_dir / "config.json").read_text()), sd


def _merged_layers(ws: Path, cfg: WorkspaceConfig) -> list[dict]:
    return [merge_layer([load_tensors(ws / layout.layer_file(i, r)) for r in range(cfg.tensor_para_size)], cfg)
            for i in range(cfg.num_layer)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_slices_merge_back_to_hf_tensors(tiny_checkpoint, tmp_path, arch, tp):
    hf_dir = tiny_checkpoint(arch)
    ws = tmp_path / "ws"
    convert_model(str(hf_dir), ws, ConvertOptions(tp=tp))
    cfg = WorkspaceConfig.read(ws / "config.ini")
    hf_cfg, sd = _hf_state(hf_dir, arch)
    assert cfg.tensor_para_size == tp and cfg.num_layer == hf_cfg["num_hidden_layers"]
    assert cfg.attn_bias == (arch == "qwen2")
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i, merged in enumerate(_merged_layers(ws, cfg)):
        p = f"model.layers.{i}"
        for key, hf_name in names.items():
            assert torch.equal(merged[key], sd[f"{p}.{hf_name}.weight"]), (key, i)
        if arch == "qwen2":
            for key in "qkv":
                assert torch.equal(merged[f"{key}_bias"], sd[f"{p}.self_attn.{key}_proj.bias"])
        assert torch.equal(merged["attn_norm"], sd[f"{p}.input_layernorm.weight"])
        assert torch.equal(merged["ffn_norm"], sd[f"{p}.post_attention_layernorm.weight"])
    globals_ = [load_tensors(ws / layout.global_file(r)) for r in range(tp)]
    vocab = cfg.vocab_size
    embed = torch.cat([g[layout.TOK_EMBEDDINGS] for g in globals_])
    assert embed.shape[0] == cfg.padded_vocab() and not embed[vocab:].any()
    assert torch.equal(embed[:vocab], sd["model.embed_tokens.weight"])
    assert torch.equal(globals_[-1][layout.FINAL_NORM], sd["model.norm.weight"])
    if cfg.tie_word_embeddings:
        assert layout.LM_HEAD not in globals_[0]
    else:
        lm_head = torch.cat([g[layout.LM_HEAD] for g in globals_])
        assert torch.equal(lm_head[:vocab], sd["lm_head.weight"])


def test_config_keys_follow_the_hf_config(tiny_checkpoint, tmp_path):
    ws = tmp_path / "ws"
    convert_model(str(tiny_checkpoint("llama3-tied")), ws, ConvertOptions(tp=2, dtype="bf16", model_name="tiny"))
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert (cfg.model_name, cfg.weight_type, cfg.tie_word_embeddings) == ("tiny", "bf16", 1)
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.original_max_position_embeddings) == ("llama3", 8.0, 64)
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (1.0, 4.0)
    assert (cfg.head_num, cfg.kv_head_num, cfg.size_per_head, cfg.inter_size) == (8, 4, 8, 128)
    assert load_tensors(ws / layout.layer_file(0, 0))[f"{layout.W_QKV}.weight"].dtype == torch.bfloat16
    mistral = tmp_path / "mistral"
    convert_model(str(tiny_checkpoint("mistral")), mistral, ConvertOptions())
    assert WorkspaceConfig.read(mistral / "config.ini").sliding_window == 128
    tok = json.loads((ws / "tokenizer" / "tokenizer_config.json").read_text())
    assert "chat_template" in tok


def test_conversion_is_deterministic(tiny_checkpoint, tmp_path):
    hf = str(tiny_checkpoint("qwen2"))
    a, b = tmp_path / "a", tmp_path / "b"
    ma = convert_model(hf, a, ConvertOptions(tp=2))
    mb = convert_model(hf, b, ConvertOptions(tp=2))
    assert ma.digest == mb.digest
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for entry in ma.files:
        assert (a / entry.path).read_bytes() == (b / entry.path).read_bytes(), entry.path
    assert "time" not in (a / "manifest.json").read_text().lower()


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(src / "model.safetensors"), pickled / "pytorch_model.bin")
    for f in [*src.glob("tokenizer*"), src / "config.json"]:
        (pickled / f.name).write_bytes(f.read_bytes())
    result = CliRunner().invoke(main, ["convert", str(pickled), "--dst-path", str(tmp_path / "ws")])
    assert result.exit_code != 0
    assert "pickle" in result.output and "--allow-pickle" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ws").exists()
    result = CliRunner().invoke(main, ["convert", str(pickled), "--dst-path", str(tmp_path / "ws"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    Manifest.read(tmp_path / "ws").verify(tmp_path / "ws")


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unsupported_architecture_missing_tensor_and_bad_source(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    assert "unsupported architecture GPT2LMHeadModel" in _one_line_error(
        ["convert", str(broken), "--dst-path", str(tmp_path / "ws")])
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    from safetensors.torch import save_file

    save_file(sd, broken / "model.safetensors")
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "missing tensor model.layers.1.mlp.down_proj.weight" in _one_line_error(
        ["convert", str(broken), "--dst-path", str(tmp_path / "ws")])
    assert not (tmp_path / "ws").exists()
    assert "no such file" in _one_line_error(["convert", str(tmp_path / "nope"), "--dst-path", str(tmp_path / "ws")])


def test_non_empty_dst_needs_force_and_foreign_files_are_never_removed(tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("llama"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert "not empty" in _one_line_error(["convert", src, "--dst-path", str(dst)])
    assert "holds no workspace" in _one_line_error(["convert", src, "--dst-path", str(dst), "--force"])
    assert (dst / "notes.txt").read_text() == "mine" and sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    ws = tmp_path / "ws"
    convert_model(src, ws, ConvertOptions(tp=4))
    assert "not empty" in _one_line_error(["convert", src, "--dst-path", str(ws), "--tp", "2"])
    result = CliRunner().invoke(main, ["convert", src, "--dst-path", str(ws), "--tp", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert WorkspaceConfig.read(ws / "config.ini").tensor_para_size == 2
    Manifest.read(ws).verify(ws)  # no stale tp=4 files remain


def test_awq_checkpoint_import(tiny_checkpoint, tmp_path):
    """An AutoAWQ GEMM checkpoint (nibbles packed [0,2,4,6,1,3,5,7] along out) becomes an int4 workspace."""
    from safetensors.torch import save_file

    from lmdepot.formats.int4 import dequantize_int4, quantize_int4_rtn, unpack_int4

    src = tiny_checkpoint("llama")
    sd = load_file(src / "model.safetensors")
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def awq_pack(codes: torch.Tensor) -> torch.Tensor:  # (rows, cols) -> (rows, cols/8) the AutoAWQ way
        codes = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)[..., order]
        packed = (codes << (torch.arange(8) * 4)).sum(-1)
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)

    awq, expected = {}, {}
    for name, w in sd.items():
        if name.endswith("_proj.weight"):
            q = quantize_int4_rtn(w.t().float(), 32)
            prefix = name.removesuffix(".weight")
            awq[f"{prefix}.qweight"] = awq_pack(unpack_int4(q["qweight"]))
            awq[f"{prefix}.qzeros"] = awq_pack(q["zeros"].to(torch.int64))
            awq[f"{prefix}.scales"] = q["scales"]
            expected[prefix] = dequantize_int4(q["qweight"], q["scales"], q["zeros"], w.shape[1])
        else:
            awq[name] = w
    ck = tmp_path / "awq"
    ck.mkdir()
    save_file(awq, ck / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                  "zero_point": True}
    (ck / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("tokenizer*"):
        (ck / f.name).write_bytes(f.read_bytes())
    assert "--model-format awq" in _one_line_error(["convert", str(ck), "--dst-path", str(tmp_path / "x")])
    ws = tmp_path / "ws"
    convert_model(str(ck), ws, ConvertOptions(tp=2, model_format="awq"))
    wcfg = WorkspaceConfig.read(ws / "config.ini")
    assert (wcfg.weight_type, wcfg.group_size) == ("int4", 32)
    hq, d = wcfg.head_num // 2, wcfg.size_per_head
    for i in range(wcfg.num_layer):
        ranks = [load_tensors(ws / layout.layer_file(i, r)) for r in range(2)]
        deq = [{k.removesuffix(".qweight"): dequantize_int4(t[k], t[k.replace("qweight", "scales")],
                                                            t[k.replace("qweight", "zeros")],
                                                            t[k].shape[0] * 8)
                for k in t if k.endswith(".qweight")} for t in ranks]
        p = f"model.layers.{i}"
        down = torch.cat([x[layout.W_DOWN] for x in deq], 0)
        assert torch.equal(down, expected[f"{p}.mlp.down_proj"])
        up = torch.cat([x[layout.W_UP] for x in deq], 1)
        assert torch.equal(up, expected[f"{p}.mlp.up_proj"])
        q_rank1 = deq[1][layout.W_QKV][:, :hq * d]
        assert torch.equal(q_rank1, expected[f"{p}.self_attn.q_proj"][:, hq * d:])
