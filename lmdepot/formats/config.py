"""config.ini of a workspace: one `[llama]` section with TurboMind key names.

Model keys describe the artifact and must not be edited; runtime keys are defaults for serving
and may be edited freely. Reading validates types, ranges and cross-key consistency; unknown
keys round-trip with a warning.
"""

from __future__ import annotations

import configparser
import io
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from lmdepot.errors import FormatError

SECTION = "llama"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM")
WEIGHT_TYPES = ("fp16", "bf16", "int4", "int8")
ROPE_SCALING_TYPES = ("", "linear", "dynamic", "llama3")
QUANT_POLICIES = (0, 4, 8)


def _meta(kind: str, lo: float | None = None, choices: tuple = ()) -> dict:
    return {"kind": kind, "lo": lo, "choices": choices}


@dataclass
class WorkspaceConfig:
    # --- model keys: fixed by conversion -------------------------------------------------
    model_name: str = field(default="", metadata=_meta("model"))
    model_arch: str = field(default="LlamaForCausalLM", metadata=_meta("model", choices=ARCHITECTURES))
    tensor_para_size: int = field(default=1, metadata=_meta("model", lo=1))
    head_num: int = field(default=0, metadata=_meta("model", lo=1))
    kv_head_num: int = field(default=0, metadata=_meta("model", lo=1))
    size_per_head: int = field(default=0, metadata=_meta("model", lo=1))
    hidden_units: int = field(default=0, metadata=_meta("model", lo=1))
    vocab_size: int = field(default=0, metadata=_meta("model", lo=1))
    num_layer: int = field(default=0, metadata=_meta("model", lo=1))
    inter_size: int = field(default=0, metadata=_meta("model", lo=1))
    norm_eps: float = field(default=1e-6, metadata=_meta("model", lo=0.0))
    attn_bias: int = field(default=0, metadata=_meta("model", choices=(0, 1)))
    start_id: int = field(default=1, metadata=_meta("model", lo=-1))
    end_id: int = field(default=2, metadata=_meta("model", lo=-1))
    rope_theta: float = field(default=10000.0, metadata=_meta("model", lo=0.0))
    rotary_embedding: int = field(default=0, metadata=_meta("model", lo=1))
    rope_scaling_type: str = field(default="", metadata=_meta("model", choices=ROPE_SCALING_TYPES))
    rope_scaling_factor: float = field(default=0.0, metadata=_meta("model", lo=0.0))
    rope_low_freq_factor: float = field(default=0.0, metadata=_meta("model", lo=0.0))
    rope_high_freq_factor: float = field(default=0.0, metadata=_meta("model", lo=0.0))
    original_max_position_embeddings: int = field(default=0, metadata=_meta("model", lo=0))
    max_position_embeddings: int = field(default=2048, metadata=_meta("model", lo=1))
    sliding_window: int = field(default=0, metadata=_meta("model", lo=0))
    tie_word_embeddings: int = field(default=0, metadata=_meta("model", choices=(0, 1)))
    weight_type: str = field(default="fp16", metadata=_meta("model", choices=WEIGHT_TYPES))
    group_size: int = field(default=0, metadata=_meta("model", lo=0))
    # --- runtime keys: serving defaults, editable ----------------------------------------
    session_len: int = field(default=4096, metadata=_meta("runtime", lo=1))
    max_batch_size: int = field(default=64, metadata=_meta("runtime", lo=1))
    cache_max_entry_count: float = field(default=0.8, metadata=_meta("runtime", lo=0.0))
    cache_block_seq_len: int = field(default=64, metadata=_meta("runtime", lo=1))
    quant_policy: int = field(default=0, metadata=_meta("runtime", choices=QUANT_POLICIES))
    use_logn_attn: int = field(default=0, metadata=_meta("runtime", choices=(0, 1)))
    # Keys this version does not know, kept verbatim so that editing tools never drop them.
    extra: dict[str, str] = field(default_factory=dict, metadata=_meta("extra"))

    # --- derived ------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.head_num * self.size_per_head

    @property
    def kv_size(self) -> int:
        return self.kv_head_num * self.size_per_head

    def heads_of_rank(self) -> tuple[int, int]:
        """(q heads, kv heads) held by one tensor-parallel rank."""
        return self.head_num // self.tensor_para_size, self.kv_head_num // self.tensor_para_size

    def padded_vocab(self) -> int:
        """Vocab rows padded up to a multiple of tensor_para_size (padding rows are zero)."""
        tp = self.tensor_para_size
        return -(-self.vocab_size // tp) * tp

    # --- validation ---------------------------------------------------------------------
    def validate(self) -> "WorkspaceConfig":
        for f in _known_fields():
            value = getattr(self, f.name)
            lo, choices = f.metadata["lo"], f.metadata["choices"]
            if isinstance(value, float) and not math.isfinite(value):
                raise FormatError(f"config.ini: {f.name} = {value!r} must be a finite number")
            if choices and value not in choices:
                raise FormatError(f"config.ini: {f.name} = {value!r} is not one of {', '.join(map(repr, choices))}")
            if lo is not None and value < lo:
                raise FormatError(f"config.ini: {f.name} = {value!r} must be >= {lo}")
        if self.kv_head_num > self.head_num or self.head_num % self.kv_head_num:
            raise FormatError(
                f"config.ini: head_num = {self.head_num} is not a multiple of kv_head_num = {self.kv_head_num}")
        tp = self.tensor_para_size
        if self.kv_head_num % tp or self.head_num % tp:
            raise FormatError(f"config.ini: tensor_para_size = {tp} does not divide head_num = {self.head_num}"
                              f" and kv_head_num = {self.kv_head_num}")
        if self.inter_size % tp:
            raise FormatError(f"config.ini: tensor_para_size = {tp} does not divide inter_size = {self.inter_size}")
        if self.rotary_embedding > self.size_per_head:
            raise FormatError(f"config.ini: rotary_embedding = {self.rotary_embedding} exceeds"
                              f" size_per_head = {self.size_per_head}")
        if self.weight_type == "int4" and self.group_size not in (32, 64, 128, 256):
            raise FormatError(f"config.ini: group_size = {self.group_size} must be 32, 64, 128 or 256"
                              " when weight_type = int4")
        if self.weight_type != "int4" and self.group_size != 0:
            raise FormatError(f"config.ini: group_size = {self.group_size} must be 0 when"
                              f" weight_type = {self.weight_type}")
        if self.rope_scaling_type and self.rope_scaling_factor <= 0:
            raise FormatError(f"config.ini: rope_scaling_factor = {self.rope_scaling_factor} must be > 0"
                              f" when rope_scaling_type = {self.rope_scaling_type}")
        for key in ("start_id", "end_id"):
            if getattr(self, key) >= self.vocab_size:
                raise FormatError(f"config.ini: {key} = {getattr(self, key)} is outside vocab_size = {self.vocab_size}")
        return self

    # --- text round-trip -----------------------------------------------------------------
    def to_ini(self) -> str:
        out = io.StringIO()
        out.write(f"[{SECTION}]\n")
        for f in _known_fields():
            out.write(f"{f.name} = {_format_value(getattr(self, f.name))}\n")
        for key, value in self.extra.items():
            out.write(f"{key} = {value}\n")
        return out.getvalue()

    @classmethod
    def from_ini(cls, text: str, source: str = "config.ini") -> "WorkspaceConfig":
        parser = configparser.ConfigParser(interpolation=None, strict=True)
        parser.optionxform = str  # keep key case
        try:
            parser.read_string(text, source=source)
        except configparser.Error as exc:
            raise FormatError(f"{source}: not a valid ini file: {str(exc).splitlines()[0]}") from None
        if not parser.has_section(SECTION):
            raise FormatError(f"{source}: missing the [{SECTION}] section")
        values = dict(parser.items(SECTION))
        kwargs: dict = {}
        for f in _known_fields():
            if f.name not in values:
                raise FormatError(f"{source}: missing key {f.name}")
            kwargs[f.name] = _parse_value(f, values.pop(f.name), source)
        if values:
            warnings.warn(f"{source}: unknown keys kept as they are: {', '.join(values)}", stacklevel=2)
        return cls(**kwargs, extra=values).validate()

    @classmethod
    def read(cls, path: str | Path) -> "WorkspaceConfig":
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: config.ini not found")
        return cls.from_ini(path.read_text(), source=str(path))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.validate().to_ini())


def model_keys() -> list[str]:
    return [f.name for f in _known_fields() if f.metadata["kind"] == "model"]


def runtime_keys() -> list[str]:
    return [f.name for f in _known_fields() if f.metadata["kind"] == "runtime"]


def _known_fields():
    return [f for f in fields(WorkspaceConfig) if f.metadata["kind"] != "extra"]


def _format_value(value) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest repr that round-trips exactly
    return str(value)


def _parse_value(f, raw: str, source: str):
    raw = raw.strip()
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise FormatError(f"{source}: {f.name} = {raw!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    return raw
