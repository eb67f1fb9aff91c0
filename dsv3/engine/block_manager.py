"""Bookkeeping of the paged latent cache: which block holds which tokens, who uses it, what is free.

The model runner owns the cache tensors (`[num_blocks, block_size, ...]` of MLA latents: the
`kv_lora_rank` latent plus the `qk_rope_head_dim` rope key per token per layer); this module only
hands out block ids. Each block has a reference count; a sequence's `block_table` lists its blocks
in token order, so token `p` lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Prefix caching: once every token of a full block is computed, the block is entered under a chained
hash, `hash(parent block's hash, the block's token ids)`, so equal hashes mean equal whole
prefixes. A new sequence whose leading full blocks hash the same shares those blocks (reference
count + 1) and skips computing them. Freed blocks keep their contents and hash until they are
handed out again, least recently freed first, so a finished request's prefix stays reusable while
memory allows. Only full, computed blocks are shared, and never the block holding a sequence's
last prompt token (its logits must be computed), so a block that is written is never shared.

No torch here: the module is tested with plain `Sequence` objects.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from dsv3.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: list[int]) -> int:
    """Chained hash of a full block: 64 bits of BLAKE2b over the parent hash and the token ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update((-1 if parent is None else parent).to_bytes(8, "little", signed=True))
    for t in token_ids:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little", signed=True)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and computed
        self.token_ids: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    """Reference-counted blocks with a least-recently-freed free list and a prefix-hash index."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # prefix-cache counters (tokens), over the manager's lifetime
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of those, tokens found in the cache

    # ---- state ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def reset_prefix_cache(self) -> None:
        """Forget every hash of a free block (blocks in use keep theirs)."""
        for bid in self.free_ids:
            self._unhash(self.blocks[bid])

    # ---- internals --------------------------------------------------------------------------
    def _unhash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash = None
        block.token_ids = ()

    def _take_free_block(self) -> Block:
        bid, _ = self.free_ids.popitem(last=False)  # least recently freed
        block = self.blocks[bid]
        assert block.ref_count == 0, block
        self._unhash(block)  # its old contents are about to be overwritten
        block.ref_count = 1
        return block

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks equal to `seq`'s leading full blocks, the last token excluded."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        matched: list[int] = []
        parent = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = seq.token_slice(i * bs, (i + 1) * bs)
            h = block_hash(parent, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(tokens):
                break
            matched.append(bid)
            parent = h
        return matched

    # ---- admission --------------------------------------------------------------------------
    def blocks_to_allocate(self, seq: Sequence) -> int:
        """Free blocks `allocate(seq)` would consume (cache hits on blocks in use cost nothing)."""
        matched = self._match_prefix(seq)
        in_use = sum(1 for bid in matched if self.blocks[bid].ref_count > 0)
        return seq.num_blocks_needed(self.block_size) - in_use

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_to_allocate(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its current tokens, sharing cached prefix blocks.

        Sets `seq.block_table`, and `seq.num_computed_tokens = seq.num_cached_tokens` to the
        number of tokens found in the prefix cache.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        if not self.can_allocate(seq):
            raise ValueError(f"sequence {seq.seq_id} needs {self.blocks_to_allocate(seq)} blocks, "
                             f"{self.num_free_blocks} free")
        matched = self._match_prefix(seq)
        for bid in matched:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_ids[bid]
            block.ref_count += 1
        table = list(matched)
        for _ in range(seq.num_blocks_needed(self.block_size) - len(matched)):
            table.append(self._take_free_block().block_id)
        seq.block_table = table
        seq.num_cached_tokens = len(matched) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.num_hashed_blocks = len(matched)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens

    # ---- growth -----------------------------------------------------------------------------
    def blocks_to_append(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens (default: all its current tokens)."""
        return max(0, seq.num_blocks_needed(self.block_size, num_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self.blocks_to_append(seq, num_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow `seq.block_table` so it holds `num_tokens` tokens (default: all its tokens)."""
        need = self.blocks_to_append(seq, num_tokens)
        if need > self.num_free_blocks:
            raise ValueError(f"sequence {seq.seq_id} needs {need} more blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_free_block().block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back `seq`'s blocks past those holding `num_tokens` tokens (speculative slots of rejected
        drafts). Such blocks were never full and computed, so they hold no hash; they go to the front of the
        free list, to be handed out before any block that still holds a reusable prefix."""
        keep = seq.num_blocks_needed(self.block_size, num_tokens)
        if keep < seq.num_hashed_blocks:
            raise ValueError(f"sequence {seq.seq_id}: cannot trim to {num_tokens} tokens, "
                             f"{seq.num_hashed_blocks} blocks are committed")
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            assert block.ref_count == 1 and block.hash is None, block
            block.ref_count = 0
            self.free_ids[block.block_id] = None
            self.free_ids.move_to_end(block.block_id, last=False)

    def commit(self, seq: Sequence) -> None:
        """Enter `seq`'s newly full and computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            tokens = seq.token_slice(i * bs, (i + 1) * bs)
            h = block_hash(parent, tokens)
            if block.hash is not None and block.hash != h:
                self._unhash(block)
            block.hash = h
            block.token_ids = tuple(tokens)
            self.hash_to_block.setdefault(h, block.block_id)  # the first computed copy stays the entry
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    # ---- release ----------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks that reach zero go to the free list, tail first, so
        the end of a sequence is reused before its (more shareable) beginning."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            assert block.ref_count > 0, block
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0  # num_cached_tokens stays: it reports the last admission
