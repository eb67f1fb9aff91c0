"""Scheduler with a fake model over a fake paged cache.

The fake cache stores, per slot, the (position, token) that was "computed" there; the fake model
checks, before sampling, that the sequence's block table reads back exactly its own tokens at
every position, then returns a token that depends on the whole sequence. Outputs are compared
with straight-line generation by the same function, so every scheduling decision (chunking,
prefix sharing, preemption, resume) is checked for its effect on the result.
"""

import random

import pytest

from dsv3.engine.block_manager import BlockManager
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import Sequence, SequenceStatus

VOCAB = 50
EOS = 0


def next_token(tokens):
    h = 0
    for t in tokens:
        h = (h * 31 + t + 7) % 1_000_003
    return 1 + h % (VOCAB - 1)  # never EOS unless a test says so


def reference(prompt, max_tokens, fn=next_token, stop=()):
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = fn(tokens)
        out.append(t)
        tokens.append(t)
        if t in stop:
            break
    return out


class FakeEngine:
    def __init__(self, num_blocks, block_size, max_num_seqs=8, max_num_batched_tokens=32, fn=next_token, **kw):
        self.bm = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, eos_token_ids=[EOS], **kw)
        self.cache = {}
        self.fn = fn
        self.steps = []
        self.next_id = 0

    def add(self, prompt, **params):
        s = Sequence(self.next_id, prompt, SamplingParams(**params))
        self.next_id += 1
        self.sched.add(s)
        return s

    def slot(self, s, pos):
        bs = self.bm.block_size
        return s.block_table[pos // bs] * bs + pos % bs

    def step(self):
        out = self.sched.schedule()
        self.steps.append(out)
        assert out.num_batched_tokens <= self.sched.max_num_batched_tokens
        assert len(out.scheduled) <= self.sched.max_num_seqs
        assert len({id(x.seq) for x in out.scheduled}) == len(out.scheduled)
        sampled = []
        for item in out.scheduled:
            s = item.seq
            assert item.start == s.num_computed_tokens and item.num_tokens >= 1
            for pos in range(item.start, item.start + item.num_tokens):
                self.cache[self.slot(s, pos)] = (pos, s.token_id_at(pos))
            if item.sample:
                end = item.start + item.num_tokens
                seen = [self.cache.get(self.slot(s, p)) for p in range(end)]
                assert seen == [(p, s.token_id_at(p)) for p in range(end)], f"cache of {s} is wrong"
                sampled.append(self.fn(s.token_ids))
        return self.sched.postprocess(out, sampled)

    def run(self, max_steps=10_000, arrivals=None):
        arrivals = dict(arrivals or {})
        finished = []
        step = 0
        while self.sched.has_unfinished() or arrivals:
            for prompt, params in arrivals.pop(step, []):
                self.add(prompt, **params)
            finished += self.step()
            step += 1
            assert step < max_steps, "no progress"
        return finished


def test_single_request_matches_straight_line_generation():
    eng = FakeEngine(num_blocks=16, block_size=4)
    s = eng.add(list(range(1, 11)), max_tokens=7)
    eng.run()
    assert s.output_token_ids == reference(range(1, 11), 7)
    assert s.finish_reason == "length" and s.status is SequenceStatus.FINISHED
    assert eng.bm.num_free_blocks == 16


def test_chunked_prefill_respects_the_budget_and_mixes_with_decodes():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    short = eng.add([1, 2, 3], max_tokens=12)
    eng.step()  # short is prefilled and decoding
    long = eng.add(list(range(1, 30)), max_tokens=3)
    eng.run()
    chunks = [x.num_tokens for out in eng.steps for x in out.scheduled if x.seq is long and not x.sample]
    assert len(chunks) >= 3 and max(chunks) <= 8
    mixed = [out for out in eng.steps if {x.seq.seq_id for x in out.scheduled} == {0, 1}]
    assert any(any(x.seq is long and x.num_tokens > 1 for x in out.scheduled) for out in mixed)
    assert all(out.num_batched_tokens <= 8 for out in eng.steps)
    assert short.output_token_ids == reference([1, 2, 3], 12)
    assert long.output_token_ids == reference(range(1, 30), 3)


def test_many_requests_joining_mid_flight():
    rng = random.Random(1)
    arrivals = {}
    prompts = []
    for i in range(20):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
        n = rng.randrange(1, 15)
        prompts.append((prompt, n))
        arrivals.setdefault(rng.randrange(30), []).append((prompt, {"max_tokens": n}))
    eng = FakeEngine(num_blocks=40, block_size=4, max_num_seqs=5, max_num_batched_tokens=16)
    finished = eng.run(arrivals=arrivals)
    assert len(finished) == 20
    for s in finished:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.params.max_tokens)
    assert eng.bm.num_free_blocks == 40
    assert max(len(out.scheduled) for out in eng.steps) == 5


def test_preemption_frees_the_youngest_and_it_resumes_correctly():
    # 2 sequences of 4 + 12 tokens need 4 blocks each at the end; 6 blocks cannot hold both
    eng = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    a = eng.add([1, 2, 3, 4], max_tokens=12)
    b = eng.add([5, 6, 7, 8], max_tokens=12)
    preempted = []
    while eng.sched.has_unfinished():
        eng.step()
        for victim in eng.steps[-1].preempted:
            preempted.append(victim)
            assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            assert eng.sched.waiting[0] is victim
    assert preempted and all(v is b for v in preempted), "the youngest sequence is the one preempted"
    assert b.num_preemptions >= 1 and eng.sched.num_preemptions == len(preempted)
    assert a.output_token_ids == reference([1, 2, 3, 4], 12)
    assert b.output_token_ids == reference([5, 6, 7, 8], 12)
    assert eng.bm.num_free_blocks == 6


def test_random_load_with_a_tiny_cache():
    rng = random.Random(2)
    eng = FakeEngine(num_blocks=12, block_size=2, max_num_seqs=6, max_num_batched_tokens=10)
    arrivals = {}
    for i in range(25):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
        arrivals.setdefault(rng.randrange(40), []).append((prompt, {"max_tokens": rng.randrange(1, 12)}))
    finished = eng.run(arrivals=arrivals)
    assert len(finished) == 25
    assert eng.sched.num_preemptions > 0
    for s in finished:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.params.max_tokens)


def test_first_come_first_served_admission():
    eng = FakeEngine(num_blocks=10, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    a = eng.add([1] * 6, max_tokens=10)  # 2 blocks, 4 at the end
    big = eng.add([2] * 36, max_tokens=2)  # 9 blocks: waits until a is done
    small = [eng.add([3], max_tokens=2) for _ in range(3)]  # would fit beside a, but must not overtake
    first = {}
    step = 0
    while eng.sched.has_unfinished():
        eng.step()
        for x in eng.steps[-1].scheduled:
            first.setdefault(x.seq.seq_id, step)
        step += 1
    assert first[big.seq_id] > first[a.seq_id] + 5, "the big prompt really had to wait"
    order = sorted(first, key=lambda i: (first[i], i))
    assert order == [s.seq_id for s in [a, big] + small]
    for s in [a, big] + small:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.params.max_tokens)


def test_no_starvation_under_a_steady_stream():
    # a long prompt (15 blocks of 16) arrives while short requests keep coming; a scheduler that let
    # the shorts overtake it would keep it waiting until the stream ends at step 200
    eng = FakeEngine(num_blocks=16, block_size=4, max_num_seqs=3, max_num_batched_tokens=6)
    arrivals = {t: [([t % 40 + 1, 2], {"max_tokens": 8})] for t in range(200)}
    arrivals[3] = [(list(range(1, 60)), {"max_tokens": 5})]
    eng.run(arrivals=arrivals)
    long = [x.seq for out in eng.steps for x in out.scheduled if x.seq.num_prompt_tokens == 59][0]
    steps = [i for i, out in enumerate(eng.steps) for x in out.scheduled if x.seq is long]
    assert steps[0] > 3, "the long prompt had to wait for blocks"
    assert long.output_token_ids == reference(range(1, 60), 5)
    assert steps[-1] < 60


def test_shared_prefix_is_computed_once():
    eng = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    prefix = list(range(1, 17))
    a = eng.add(prefix + [20], max_tokens=3)
    eng.run()
    b = eng.add(prefix + [30, 31], max_tokens=3)
    eng.step()
    assert b.num_cached_tokens == 16 and eng.bm.prefix_hits == 16
    assert eng.steps[-1].scheduled[0].start == 16 and eng.steps[-1].scheduled[0].num_tokens == 2
    eng.run()
    assert a.output_token_ids == reference(prefix + [20], 3)
    assert b.output_token_ids == reference(prefix + [30, 31], 3)


def test_eos_stop_token_ids_and_ignore_eos():
    def fn(tokens):
        return EOS if len(tokens) == 6 else (42 if len(tokens) == 8 else 5)
    eng = FakeEngine(num_blocks=32, block_size=4, fn=fn)
    a = eng.add([1, 2, 3], max_tokens=10)
    b = eng.add([1, 2, 3], max_tokens=10, ignore_eos=True, stop_token_ids=[42])
    c = eng.add([1, 2, 3], max_tokens=10, ignore_eos=True)
    eng.run()
    assert a.output_token_ids == [5, 5, 5, EOS] and a.finish_reason == "stop"
    assert b.output_token_ids == [5, 5, 5, EOS, 5, 42] and b.finish_reason == "stop"
    assert c.num_output_tokens == 10 and c.finish_reason == "length"


def test_max_model_len_ends_with_length():
    eng = FakeEngine(num_blocks=32, block_size=4, max_model_len=10)
    s = eng.add([1, 2, 3], max_tokens=None)
    eng.run()
    assert s.num_tokens == 10 and s.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add(list(range(1, 11)))


def test_abort_waiting_and_running_frees_blocks():
    eng = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=8)
    a = eng.add([1, 2, 3], max_tokens=50)
    b = eng.add([4, 5, 6], max_tokens=50)
    eng.step()
    eng.step()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert eng.sched.abort(b.seq_id) is b and b.finish_reason == "abort"
    assert eng.sched.abort(a.seq_id) is a and eng.bm.num_free_blocks == 8
    assert not eng.sched.has_unfinished() and eng.sched.abort(99) is None


def test_budget_must_cover_max_num_seqs():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=4)


class FakeSpecEngine(FakeEngine):
    """Speculative decoding with the fake model: a fake drafter guesses the next k tokens (right with
    probability 0.7 each), verification keeps drafts while they equal the model's choice, then one more token."""

    def __init__(self, *args, k=3, seed=0, **kw):
        super().__init__(*args, num_draft_tokens=k, **kw)
        self.k = k
        self.rng = random.Random(seed)
        self.limits = []  # (drafts, tokens still allowed) of each verified sequence

    def guess(self, tokens):
        out = []
        for _ in range(self.k):
            t = self.fn(tokens + out)
            out.append(t if self.rng.random() < 0.7 else 1 + (t % (VOCAB - 1)))
        return out

    def step(self):
        out = self.sched.schedule()
        self.steps.append(out)
        assert out.num_batched_tokens <= self.sched.max_num_batched_tokens
        sampled = []
        for item in out.scheduled:
            s = item.seq
            if item.drafts:
                self.limits.append((len(item.drafts), s.params.max_tokens - s.num_output_tokens))
            n_own = item.num_tokens - len(item.drafts)
            assert len(s.block_table) * self.bm.block_size >= item.start + item.num_tokens  # slots for the drafts
            tokens = s.token_slice(item.start, item.start + n_own) + item.drafts
            for pos, t in zip(range(item.start, item.start + item.num_tokens), tokens):
                self.cache[self.slot(s, pos)] = (pos, t)
            if item.sample:
                end = item.start + n_own
                seen = [self.cache.get(self.slot(s, p)) for p in range(end)]
                assert seen == [(p, s.token_id_at(p)) for p in range(end)], f"cache of {s} is wrong"
                keep, history = [], s.token_ids
                for d in item.drafts + [None]:
                    t = self.fn(history + keep)
                    keep.append(t)
                    if t != d:
                        break
                sampled.append(keep)
                s.draft_token_ids = self.guess(s.token_ids + keep)
        finished = self.sched.postprocess(out, sampled)
        for item in out.scheduled:  # rollback: only the kept tokens hold blocks once the step is done
            s = item.seq
            if item.sample and not s.is_finished:
                assert len(s.block_table) == s.num_blocks_needed(self.bm.block_size, s.num_computed_tokens)
                assert s.num_computed_tokens == s.num_tokens - 1
        return finished


@pytest.mark.parametrize("num_blocks", [64, 9])  # 9: preemption
def test_speculative_steps_keep_outputs_blocks_and_hashes(num_blocks):
    rng = random.Random(3)
    requests = [([rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))], rng.randrange(1, 20))
                for _ in range(8)]
    arrivals = {}
    for i, (prompt, n) in enumerate(requests):
        arrivals.setdefault(i // 2 * 3, []).append((prompt, {"max_tokens": n}))
    plain = FakeEngine(num_blocks=num_blocks, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    spec = FakeSpecEngine(num_blocks=num_blocks, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    done = {}
    for eng in (plain, spec):
        done[eng] = sorted(eng.run(arrivals=arrivals), key=lambda s: s.seq_id)
        assert eng.bm.num_free_blocks == num_blocks
    for a, b in zip(done[plain], done[spec]):
        assert b.output_token_ids == a.output_token_ids == reference(a.prompt_token_ids, a.params.max_tokens)
    assert set(spec.bm.hash_to_block) == set(plain.bm.hash_to_block)
    drafted, accepted = spec.sched.spec_drafted, spec.sched.spec_accepted
    assert drafted[0] > 0 and 0 < accepted[0] < drafted[0] and drafted == sorted(drafted, reverse=True)
    assert len(spec.steps) < len(plain.steps)  # accepted drafts save steps
    if num_blocks == 9:
        assert spec.sched.num_preemptions > 0
    drafts_per_step = [len(x.drafts) for out in spec.steps for x in out.scheduled]
    assert max(drafts_per_step) == 3


def test_drafts_respect_max_tokens_and_the_budget():
    eng = FakeSpecEngine(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=4, k=3)
    a = eng.add([1, 2, 3], max_tokens=3)
    b = eng.add([4, 5], max_tokens=30)
    eng.run()
    assert a.output_token_ids == reference([1, 2, 3], 3) and b.output_token_ids == reference([4, 5], 30)
    assert eng.limits and all(n < left for n, left in eng.limits)  # a kept draft never passes max_tokens
    assert all(out.num_batched_tokens <= 4 for out in eng.steps)
