"""BlockManager: allocation, freeing, reference counts and prefix-hash reuse, with plain Sequences."""

import ast
import random
from pathlib import Path

import pytest

from dsv3.engine.block_manager import BlockManager, block_hash
from dsv3.engine.sequence import Sequence

BS = 4


def seq(i, tokens):
    return Sequence(i, list(tokens))


def computed(bm, s):
    """Pretend the model ran every token of `s` and enter its full blocks in the cache."""
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def check_invariants(bm, live):
    users = {}
    for s in live:
        assert len(s.block_table) == len(set(s.block_table))
        assert len(s.block_table) * BS >= s.num_tokens
        for b in s.block_table:
            users[b] = users.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == users.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in bm.free_ids)
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h


def test_allocate_and_free_count_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(0, range(10))  # 3 blocks
    assert bm.blocks_to_allocate(a) == 3 and bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    b = seq(1, range(100, 121))  # 6 blocks > 5 free
    assert not bm.can_allocate(b)
    with pytest.raises(ValueError, match="needs 6 blocks"):
        bm.allocate(b)
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == [] and a.num_computed_tokens == 0
    assert bm.can_allocate(b)
    check_invariants(bm, [])


def test_append_slots_grows_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq(0, range(4))
    bm.allocate(a)
    assert len(a.block_table) == 1 and bm.blocks_to_append(a) == 0
    a.append_token(9)  # 5 tokens: a second block is needed
    assert bm.blocks_to_append(a) == 1
    bm.append_slots(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.blocks_to_append(a, num_tokens=16) == 2 and not bm.can_append(a, num_tokens=17)
    check_invariants(bm, [a])


def test_prefix_blocks_are_shared_after_they_are_computed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(0, range(10))
    bm.allocate(a)
    b = seq(1, list(range(8)) + [50, 51])
    bm.allocate(b)
    assert b.num_computed_tokens == 0, "blocks not yet computed must not be shared"
    computed(bm, a)
    c = seq(2, list(range(8)) + [60, 61, 62])
    assert bm.blocks_to_allocate(c) == 1  # two shared full blocks, one new
    bm.allocate(c)
    assert c.block_table[:2] == a.block_table[:2]
    assert c.num_computed_tokens == c.num_cached_tokens == 8
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    assert bm.prefix_hits == 8 and bm.prefix_queries == 10 + 10 + 11
    check_invariants(bm, [a, b, c])


def test_hashes_are_chained_over_the_whole_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(0, list(range(8)) + [99])
    bm.allocate(a)
    computed(bm, a)
    # same second block, different first block: no reuse at all
    d = seq(1, [70, 71, 72, 73] + list(range(4, 8)) + [99])
    bm.allocate(d)
    assert d.num_cached_tokens == 0
    assert block_hash(None, [0, 1, 2, 3]) != block_hash(None, [70, 71, 72, 73])
    assert block_hash(block_hash(None, [0, 1, 2, 3]), [4, 5, 6, 7]) != block_hash(None, [4, 5, 6, 7])
    check_invariants(bm, [a, d])


def test_the_block_with_the_last_prompt_token_is_never_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(0, range(12))
    bm.allocate(a)
    computed(bm, a)
    e = seq(1, range(8))  # equal to a's first two blocks; its last token must still be computed
    bm.allocate(e)
    assert e.num_cached_tokens == 4 and e.block_table[0] == a.block_table[0]
    assert e.block_table[1] != a.block_table[1]
    check_invariants(bm, [a, e])


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = seq(0, range(9))
    bm.allocate(a)
    computed(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = seq(1, list(range(8)) + [40])
    assert bm.blocks_to_allocate(b) == 3  # cached but free blocks still come out of the free list
    bm.allocate(b)
    assert b.block_table[:2] == first_two and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 3
    bm.free(b)
    # fill the cache with other tokens: the old prefix is evicted and no longer matches
    fill = seq(2, range(100, 124))
    bm.allocate(fill)
    bm.free(fill)
    c = seq(3, list(range(8)) + [40])
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    check_invariants(bm, [c])


def test_shared_block_survives_until_its_last_user_frees_it():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(0, range(6))
    bm.allocate(a)
    computed(bm, a)
    b = seq(1, list(range(4)) + [7, 7])
    bm.allocate(b)
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.blocks[shared].ref_count == 2
    bm.free(a)
    assert bm.blocks[shared].ref_count == 1 and shared not in bm.free_ids
    bm.free(b)
    assert bm.blocks[shared].ref_count == 0 and shared in bm.free_ids
    check_invariants(bm, [])


def test_random_operations_keep_the_books_straight():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=24, block_size=BS)
    live = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(400):
        op = rng.random()
        if op < 0.4:
            tokens = rng.choice(prefixes)[:rng.randrange(1, 13)] + [rng.randrange(50) for _ in range(rng.randrange(6))]
            s = seq(step, tokens or [1])
            if bm.can_allocate(s):
                bm.allocate(s)
                assert s.num_cached_tokens % BS == 0 and s.num_cached_tokens < s.num_tokens
                assert s.token_ids[:s.num_cached_tokens] == [t for b in s.block_table[:s.num_cached_tokens // BS]
                                                            for t in bm.blocks[b].token_ids]
                live.append(s)
        elif op < 0.7 and live:
            s = rng.choice(live)
            s.append_token(rng.randrange(50))
            if bm.can_append(s):
                bm.append_slots(s)
                computed(bm, s)
            else:
                s.output_token_ids.pop()
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
        check_invariants(bm, live)
    assert bm.prefix_hits > 0


def test_plain_modules_import_no_torch_or_model_code():
    root = Path(__file__).resolve().parents[2] / "dsv3" / "engine"
    for name in ("sequence.py", "block_manager.py", "scheduler.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                continue  # lazy import inside a function or TYPE_CHECKING block
            for m in mods:
                assert not m.startswith(("torch", "dsv3.model", "dsv3.kernels")), (name, m)
                assert m != "dsv3.engine.sampling", (name, m)
