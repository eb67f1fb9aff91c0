"""One client cannot starve the others: a long prompt arriving while other streams decode is prefilled in
slices of at most `long_prefill_token_threshold` tokens, each step still decoding every other stream
(issue 20: one 4,000-token prompt stalled eight streams). Scheduler-level, with a fake model whose next
token depends on the whole sequence, so the outputs are checked against straight-line generation too.
"""

from __future__ import annotations

import pytest

from dsv3.engine.block_manager import BlockManager
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import Sequence


def next_token(tokens: list[int]) -> int:
    h = 0
    for t in tokens:
        h = (h * 31 + t + 7) % 1_000_003
    return 2 + h % 90


def straight_line(prompt: list[int], n: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


def run(threshold: int | None):
    sched = Scheduler(BlockManager(2048, 16), max_num_seqs=16, max_num_batched_tokens=2048,
                      long_prefill_token_threshold=threshold)
    streams = [Sequence(i, [10 + i, 20 + i, 30 + i], SamplingParams(max_tokens=40)) for i in range(8)]
    for s in streams:
        sched.add(s)
    long = None
    steps = []
    while sched.has_unfinished():
        if len(steps) == 3:  # the eight streams are decoding by now
            long = Sequence(99, [(7 * k) % 97 + 1 for k in range(4000)], SamplingParams(max_tokens=4))
            sched.add(long)
        out = sched.schedule()
        steps.append(out)
        sched.postprocess(out, [next_token(x.seq.token_ids) for x in out.scheduled if x.sample])
    for s in streams:
        assert s.output_token_ids == straight_line(s.prompt_token_ids, 40)
    assert long.output_token_ids == straight_line(long.prompt_token_ids, 4)
    return steps, streams, long


def test_long_prompt_is_sliced_between_decode_steps():
    steps, streams, long = run(threshold=256)
    ids = {s.seq_id for s in streams}
    prefill_steps = [out for out in steps if any(x.seq is long and not x.sample for x in out.scheduled)]
    assert len(prefill_steps) >= 4000 // 256
    for out in prefill_steps:
        chunk = next(x.num_tokens for x in out.scheduled if x.seq is long)
        running = {x.seq.seq_id for x in out.scheduled} & ids
        assert chunk <= 256
        assert running == ids  # every stream decodes in every step of the slicing (they run 40 tokens)


def test_default_threshold_is_a_quarter_of_the_budget_and_zero_turns_it_off():
    assert Scheduler(BlockManager(8, 16), max_num_batched_tokens=2048).long_prefill_token_threshold == 512
    steps, _, long = run(threshold=0)
    biggest = max(x.num_tokens for out in steps for x in out.scheduled if x.seq is long)
    assert biggest > 1024  # without the limit a step takes the whole budget's worth of the prompt
    with pytest.raises(ValueError):
        Scheduler(BlockManager(8, 16), long_prefill_token_threshold=-1)
