"""`LLM(fast=True)`: the GPU path (fused kernels for every step, CUDA graphs for decode steps, over the
engine's paged cache), all through the model's one forward.

CPU: `fast=True` is refused off CUDA by `LLM` before anything is loaded or changed, `fast=False` leaves the
model as it was, the CLI flags, and the kernel backend run eagerly (`ModelRunner(fast=True, cuda_graphs=False)`:
the kernels' PyTorch references, SDPA prefill) against `transformers`' greedy generate. GPU (`gpu` marker):
greedy tokens of `LLM(fast=True)` equal `LLM(fast=False)` (and `transformers`) token for token, on a tiny
float32 checkpoint, with prompts of different lengths, requests finishing at different steps, chunked
prefill and mixed steps, preemption and prefix-cache hits."""


import pytest
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.model_runner import ModelRunner
from engine_fixtures import Oracle, random_prompts

MAX_NEW = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_v3_fast")
    return folder, Oracle(folder)


def greedy(n=MAX_NEW, logprobs=None):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)


def is_prepared(model) -> bool:
    return any(getattr(m, "stacked", None) is not None or getattr(m, "fused", False) for m in model.modules())


def eager_kernels(llm):
    """Swap in a runner on the kernel backend without graphs (the same cache size, a fresh cache)."""
    runner = llm.runner
    llm.runner = ModelRunner(llm.model, block_size=runner.block_size, num_blocks=runner.num_blocks, fast=True,
                             max_num_seqs=4, cuda_graphs=False)
    return llm


# ---- CPU -------------------------------------------------------------------------------------------
def test_fast_needs_cuda_and_changes_nothing_before_refusing(ckpt):
    folder, _ = ckpt
    with pytest.raises(ValueError, match="fast=True needs a CUDA device"):
        LLM(folder, device="cpu", dtype=torch.float32, num_blocks=8, fast=True)
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="fast=True needs a CUDA device"):
        LLM(model, num_blocks=8, fast=True)
    with pytest.raises(ValueError, match="CUDA graphs need fast=True and a CUDA device"):
        ModelRunner(model, num_blocks=8, fast=True, cuda_graphs=True)
    assert not is_prepared(model)


def test_fast_off_is_the_default_on_cpu(ckpt):
    folder, oracle = ckpt
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    llm = LLM(model, num_blocks=32, block_size=4, max_num_seqs=3, max_num_batched_tokens=8)
    assert llm.runner.graphs is None and not llm.runner.backend.kernels and not is_prepared(model)
    prompts = random_prompts([5, 11, 2], seed=7)
    for prompt, out in zip(prompts, llm.generate(prompts, greedy(), use_tqdm=False)):
        assert out.token_ids == oracle.greedy(prompt, MAX_NEW)


@pytest.mark.triton
def test_eager_kernel_backend_on_cpu_equals_transformers(ckpt):
    """The kernel backend's step tensors (slots, block tables, sequence lengths, prefill groups) with chunked
    prefill and mixed steps, eagerly without graphs (on CPU the kernels run under Triton's interpreter, so the
    run is kept short; the GPU tests below cover preemption and prefix hits)."""
    folder, oracle = ckpt
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    llm = eager_kernels(LLM(model, num_blocks=14, block_size=4, max_num_seqs=4, max_num_batched_tokens=5))
    assert is_prepared(model) and llm.runner.backend.kernels
    prompts = random_prompts([6, 1, 3], seed=8)
    lengths = [3, 4, 2]
    outputs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    for prompt, n, out in zip(prompts, lengths, outputs):
        assert out.token_ids == oracle.greedy(prompt, n), f"prompt of {len(prompt)} tokens"
    assert llm.block_manager.num_free_blocks == 14


def _record_steps(runner):
    """Spy on the runner's steps: (batch, sampling rows) of each decode-shaped step (one token per sequence)."""
    real = runner.execute
    steps = []

    def execute(out):
        result = real(out)
        if out.scheduled and all(item.num_tokens == 1 for item in out.scheduled):
            steps.append((len(out.scheduled), len(result)))
        return result

    runner.execute = execute
    return steps


# ---- GPU -------------------------------------------------------------------------------------------
def _pair(folder, **kwargs):
    """The same checkpoint in two engines on the GPU, float32: the PyTorch path and the fast path."""
    slow = LLM(folder, device="cuda", dtype=torch.float32, fast=False, **kwargs)
    fast = LLM(folder, device="cuda", dtype=torch.float32, **kwargs)  # the default on CUDA: fast
    assert slow.runner.graphs is None and not is_prepared(slow.model)
    assert fast.runner.graphs is not None and is_prepared(fast.model)
    return slow, fast


def _same(slow_outputs, fast_outputs):
    for s, f in zip(slow_outputs, fast_outputs):
        assert f.token_ids == s.token_ids, f"prompt of {len(s.prompt_token_ids)} tokens"
        assert f.finish_reason == s.finish_reason


@pytest.mark.gpu
def test_fast_equals_default_path_for_a_batch_finishing_at_different_steps(ckpt):
    folder, oracle = ckpt
    slow, fast = _pair(folder, num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=8)
    assert sorted(fast.runner.graphs.graphs) == [1, 2, 4, 6]
    prompts = random_prompts([3, 13, 7, 22, 1, 9], seed=11)
    lengths = [10, 4, 12, 7, 9, 2]  # the batch shrinks 6 -> 5 -> ... : replays padded to 6, 4, 2
    params = [greedy(n, logprobs=2 if i % 2 else None) for i, n in enumerate(lengths)]
    expected = slow.generate(prompts, params, use_tqdm=False)
    got = fast.generate(prompts, params, use_tqdm=False)
    _same(expected, got)
    for prompt, n, out in zip(prompts, lengths, got):
        assert out.token_ids == oracle.greedy(prompt, n)
    for s, f in zip(expected, got):  # the raw log-probabilities of the chosen tokens agree
        if s.logprobs is not None:
            assert [lp.token_id for lp in f.logprobs] == [lp.token_id for lp in s.logprobs]
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in f.logprobs]),
                                       torch.tensor([lp.logprob for lp in s.logprobs]), atol=1e-4, rtol=1e-4)
    assert fast.runner.graph_steps > 0
    assert fast.block_manager.num_free_blocks == 64


@pytest.mark.gpu
def test_fast_equals_default_path_with_one_token_prefill_chunks(ckpt):
    folder, oracle = ckpt
    slow, fast = _pair(folder, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=4)
    steps = _record_steps(fast.runner)
    prompts = random_prompts([1, 2, 1, 11, 5], seed=9)
    expected = slow.generate(prompts, greedy(), use_tqdm=False)
    got = fast.generate(prompts, greedy(), use_tqdm=False)
    _same(expected, got)
    for prompt, out in zip(prompts, got):
        assert out.token_ids == oracle.greedy(prompt, MAX_NEW)
    assert any(m < b for b, m in steps)  # decode-shaped steps with a row that does not sample


@pytest.mark.gpu
def test_fast_equals_default_path_with_preemption(ckpt):
    folder, oracle = ckpt
    # 12 blocks of 4 = 48 tokens; four requests need 14-22 tokens each
    slow, fast = _pair(folder, num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = random_prompts([6, 10, 12, 4], seed=2)
    expected = slow.generate(prompts, greedy(), use_tqdm=False)
    got = fast.generate(prompts, greedy(), use_tqdm=False)
    assert fast.num_preemptions > 0
    _same(expected, got)
    for prompt, out in zip(prompts, got):
        assert out.token_ids == oracle.greedy(prompt, MAX_NEW)
    assert fast.runner.graph_steps > 0
    assert fast.block_manager.num_free_blocks == 12


@pytest.mark.gpu
def test_fast_with_prefix_hits_one_token_tails_and_batch_one(ckpt):
    folder, oracle = ckpt
    slow, fast = _pair(folder, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    prefix = random_prompts([16], seed=4)[0]
    first = [prefix + [7]]
    tails = [prefix + [t] for t in (9, 30, 101)]  # after the cache hit, one token each: a decode-shaped step
    for llm in (slow, fast):
        llm.generate(first, greedy(), use_tqdm=False)
    expected = slow.generate(tails, greedy(), use_tqdm=False)
    got = fast.generate(tails, greedy(), use_tqdm=False)
    assert fast.prefix_cache_hit_tokens >= 3 * 16
    _same(expected, got)
    for prompt, out in zip(tails, got):
        assert out.token_ids == oracle.greedy(prompt, MAX_NEW)
    one = LLM(folder, device="cuda", dtype=torch.float32, num_blocks=16, block_size=4, max_num_seqs=1, fast=True)
    assert sorted(one.runner.graphs.graphs) == [1]
    out = one.generate(first, greedy(32), use_tqdm=False)[0]
    assert out.token_ids == oracle.greedy(first[0], 32)
    assert one.runner.graph_steps >= 31
