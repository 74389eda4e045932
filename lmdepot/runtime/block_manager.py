"""Fixed-size KV blocks with reference counts and content-hash prefix sharing.

A block that fills up gets a hash chained over its tokens and all earlier tokens, so equal hashes
mean equal prefixes. Freed blocks keep their hash and content in an LRU free list: a later request
with the same prefix revives them instead of recomputing, until the block is handed out again.
"""

from __future__ import annotations

from collections import OrderedDict

from lmdepot.runtime.sequence import Sequence


class Block:
    __slots__ = ("id", "ref", "hash", "tokens")

    def __init__(self, block_id: int):
        self.id, self.ref, self.hash, self.tokens = block_id, 0, None, None


def chain_hash(parent, tokens) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.by_hash: dict[int, int] = {}
        self.hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + n) - len(seq.block_table))

    # --- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached full blocks for a sequence that has none yet. The last token is never matched:
        its logits are needed, so at least one token is always computed."""
        if not self.prefix_caching or seq.block_table:
            return
        bs, parent = self.block_size, None
        for i in range((len(seq) - 1) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            parent = chain_hash(parent, tokens)
            bid = self.by_hash.get(parent)
            if bid is None or self.blocks[bid].tokens != tuple(tokens):
                break
            self._take(bid)
            seq.block_table.append(bid)
            seq.block_hashes.append(parent)
            self.hits += 1
        seq.num_computed = len(seq.block_table) * bs

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of the sequence's blocks that became full this step."""
        if not self.prefix_caching:
            return
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), seq.num_computed // bs):  # only blocks that filled since last time
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            parent = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(parent)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.tokens = parent, tuple(tokens)
                self.by_hash.setdefault(parent, block.id)

    # --- allocation ----------------------------------------------------------------------------
    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref == 0:
            del self.free[bid]
        block.ref += 1

    def grow(self, seq: Sequence, n: int) -> None:
        """Give seq enough blocks for n more computed tokens; the caller checked num_free."""
        for _ in range(self.blocks_needed(seq, n)):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.by_hash.get(block.hash) == bid:
                del self.by_hash[block.hash]  # its content is about to be overwritten
            block.hash, block.tokens, block.ref = None, None, 1
            seq.block_table.append(bid)

    def release(self, table: list[int]) -> None:
        for bid in reversed(table):  # tail blocks go out first: they are the least shareable
            block = self.blocks[bid]
            block.ref -= 1
            if block.ref == 0:
                self.free[bid] = None
                if block.hash is None:
                    self.free.move_to_end(bid, last=False)  # unhashed content is worthless: reuse first

    def free_seq(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0
