"""LLM greedy outputs equal `transformers`' greedy generate on the same tiny checkpoint, under
batching, chunked prefill, requests joining mid-flight, preemption and prefix caching."""

import pytest
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams
from engine_fixtures import Oracle, random_prompts

MAX_NEW = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and the CPU is shared
    folder = tmp_path_factory.mktemp("tiny_v3")
    oracle = Oracle(folder)
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    yield folder, oracle, model
    torch.set_num_threads(threads)


def greedy(n=MAX_NEW):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def check(outputs, prompts, oracle, n=MAX_NEW):
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == oracle.greedy(prompt, n), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"


def test_batch_of_different_lengths_with_chunked_prefill(ckpt):
    folder, oracle, _ = ckpt
    llm = LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    prompts = random_prompts([3, 13, 7, 22, 1, 9])
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    check(outputs, prompts, oracle)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert llm.block_manager.num_free_blocks == 64
    assert llm.num_preemptions == 0


def test_loaded_model_and_defaults(ckpt):
    _, oracle, model = ckpt
    llm = LLM(model, cache_memory=2**20)  # a Transformer as is; cache sized from a byte budget
    assert llm.runner.cache_bytes <= 2**20 and llm.runner.num_blocks >= 1
    prompts = random_prompts([5, 16], seed=3)
    check(llm.generate(prompts, greedy(), use_tqdm=False), prompts, oracle)
    single = llm.generate(prompts[0], greedy(), use_tqdm=False)  # one token-id prompt
    assert len(single) == 1 and single[0].token_ids == oracle.greedy(prompts[0], MAX_NEW)


def test_requests_added_mid_flight(ckpt):
    _, oracle, model = ckpt
    llm = LLM(model, num_blocks=64, block_size=4, max_num_seqs=3, max_num_batched_tokens=12)
    prompts = random_prompts([4, 15, 2, 11, 6, 19], seed=1)
    ids = {llm.add_request(prompts[0], greedy()): 0}
    streamed = {}
    done = {}
    step = 0
    while llm.has_unfinished() or len(ids) < len(prompts):
        if step in (1, 2, 4, 7, 9) and len(ids) < len(prompts):
            ids[llm.add_request(prompts[len(ids)], greedy())] = len(ids)
        for out in llm.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                done[out.request_id] = out
        step += 1
    assert len(done) == len(prompts)
    for rid, i in ids.items():
        assert done[rid].token_ids == oracle.greedy(prompts[i], MAX_NEW)
        assert streamed[rid] == done[rid].token_ids


def test_preemption_with_a_tiny_cache(ckpt):
    _, oracle, model = ckpt
    # 12 blocks of 4 = 48 tokens; four requests need 14-22 tokens each
    llm = LLM(model, num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = random_prompts([6, 10, 12, 4], seed=2)
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert llm.num_preemptions > 0
    check(outputs, prompts, oracle)
    assert llm.block_manager.num_free_blocks == 12


def test_shared_prefix_hits_the_cache_and_changes_nothing(ckpt):
    _, oracle, model = ckpt
    llm = LLM(model, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    prefix = random_prompts([17], seed=4)[0]
    tails = random_prompts([1, 3, 6], seed=5)
    first = llm.generate(prefix + tails[0], greedy(), use_tqdm=False)
    assert llm.prefix_cache_hit_tokens == 0
    prompts = [prefix + t for t in tails]
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert llm.prefix_cache_hit_tokens >= 3 * 16
    assert all(o.num_cached_tokens >= 16 for o in outputs)
    check(first + outputs, [prefix + tails[0]] + prompts, oracle)


def test_query_tiling_of_long_prefills_changes_nothing(ckpt, monkeypatch):
    import dsv3.engine.attention as attention_module
    _, oracle, model = ckpt
    monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 4 * 30)  # a few queries per tile
    llm = LLM(model, num_blocks=32, block_size=4, max_num_batched_tokens=64)
    prompts = random_prompts([22, 5], seed=6)
    check(llm.generate(prompts, greedy(), use_tqdm=False), prompts, oracle)
