"""A request's state: its tokens, how many of them have KV, its blocks and its sampling knobs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over the whole context
    presence_penalty: float = 0.0    # OpenAI semantics, over output
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None      # number of top alternatives to return with each token's logprob
    # Per-request hooks (e.g. grammar-constrained decoding), called on rank 0 in the engine thread:
    # logits_processor(output_ids, logits) -> logits runs after penalties and before sampling;
    # accept_token(token_id) sees every sampled token. Neither may raise.
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    accept_token: Callable[[int], None] | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    # Slots: a step reads a dozen attributes of each of hundreds of sequences; inline slots are faster
    # to read than a per-object dict and stay in fewer cache lines.
    __slots__ = ("id", "token_ids", "num_prompt", "num_history", "num_computed", "block_table", "block_hashes",
                 "params", "session_id", "status", "finish_reason", "text_offset", "text", "detok", "logprobs",
                 "error", "generator")

    def __init__(self, token_ids: list[int], params: SamplingParams, session_id=None, num_history: int = 0,
                 device: torch.device | str = "cpu"):
        self.id = next(_ids)
        self.token_ids = list(token_ids)
        self.num_prompt = len(token_ids)       # includes a session's history
        self.num_history = num_history         # tokens of earlier turns, not part of this request's output
        self.num_computed = 0                  # leading tokens whose KV is in this sequence's blocks
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []      # chained hashes of the leading full blocks, once published
        self.params = params
        self.session_id = session_id
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text_offset = 0                   # chars of output text already streamed
        self.text = ""
        self.detok = [0, 0, ""]                # incremental detokenization: prefix id, settled ids, their text
        self.logprobs: list[dict] = []
        self.error: Exception | None = None
        self.generator = None
        if params.seed is not None:   # on the device that samples (the runner's): no host round trip
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
