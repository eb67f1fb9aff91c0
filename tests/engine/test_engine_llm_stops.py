"""LLM: EOS, stop token ids and stop strings end sequences at the right token; text, logprobs,
seeded sampling, abort and input errors. `transformers` (greedy generate, forward) is the oracle."""

import pytest
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams
from engine_fixtures import Oracle, random_prompts, write_word_tokenizer

N = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and the CPU is shared
    folder = tmp_path_factory.mktemp("tiny_v3_tok")
    oracle = Oracle(folder)
    write_word_tokenizer(folder)
    yield folder, oracle
    torch.set_num_threads(threads)


def engine(folder, **kw):
    return LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=4,
               max_num_batched_tokens=16, **kw)


def first_new_token(ref, at):
    """A token of `ref` at index >= `at` not seen before it (so the stop lands exactly there)."""
    for i in range(at, len(ref)):
        if ref[i] not in ref[:i]:
            return i, ref[i]
    raise AssertionError("reference output has no fresh token")


def test_eos_ends_the_sequence_like_transformers(ckpt):
    folder, oracle = ckpt
    prompt = random_prompts([7], seed=10)[0]
    ref = oracle.greedy(prompt, N)
    i, eos = first_new_token(ref, 3)
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    model.args = model.args.replace(eos_token_id=eos)
    llm = LLM(model, num_blocks=32, block_size=4)
    assert eos in llm.eos_token_ids
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[0]
    assert out.token_ids == oracle.greedy(prompt, N, eos=eos) == ref[:i + 1]
    assert out.finish_reason == "stop"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == ref and out.finish_reason == "length"


def test_stop_token_ids(ckpt):
    folder, oracle = ckpt
    prompts = random_prompts([5, 9], seed=11)
    llm = engine(folder)
    params, stops = [], []
    for p in prompts:
        i, tok = first_new_token(oracle.greedy(p, N), 2)
        params.append(SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, stop_token_ids=[tok]))
        stops.append((i, tok))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, out, (i, tok) in zip(prompts, outs, stops):
        assert out.token_ids == oracle.greedy(p, N, eos=tok)
        assert len(out.token_ids) == i + 1 and out.finish_reason == "stop"


def test_text_and_stop_strings(ckpt):
    folder, oracle = ckpt
    llm = engine(folder)
    tok = llm.tokenizer
    prompt_text = "w17 w5 w200 w33 w91 w8"
    prompt = tok.encode(prompt_text)
    assert prompt == [17, 5, 200, 33, 91, 8]
    ref = oracle.greedy(prompt, N)
    plain = llm.generate(prompt_text, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), use_tqdm=False)[0]
    assert plain.token_ids == ref and plain.text == tok.decode(ref) and plain.prompt == prompt_text
    stop = f"w{ref[6]} w{ref[7]}"  # spans two tokens
    # oracle: the shortest output whose text contains a stop string; text cut before it
    k = next(k for k in range(1, N + 1) if stop in tok.decode(ref[:k]))
    full = tok.decode(ref[:k])
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, stop=["never-there", stop])
    out = llm.generate([prompt_text], params, use_tqdm=False)[0]
    assert out.token_ids == ref[:k] and out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]


def test_streamed_text_joins_to_the_final_text(ckpt):
    folder, oracle = ckpt
    llm = engine(folder)
    rid = llm.add_request("w1 w2 w3 w4", SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))
    pieces, final = [], None
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == rid
            pieces.append(out.new_text)
            final = out
    assert "".join(pieces) == final.text == llm.tokenizer.decode(oracle.greedy([1, 2, 3, 4], N))


def test_streamed_text_never_shows_a_stop_string(ckpt):
    """A stop string that spans two tokens: the streamed pieces hold back what could begin it, so no prefix of
    the stream ever contains it, and the pieces join to the final text (cut before the stop)."""
    folder, oracle = ckpt
    llm = engine(folder)
    prompt = [17, 5, 200, 33, 91, 8]
    ref = oracle.greedy(prompt, N)
    stop = f"w{ref[6]} w{ref[7]}"
    rid = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == rid
            streamed += out.new_text
            assert stop not in streamed
            final = out
    assert final.finish_reason == "stop" and streamed == final.text
    full = llm.tokenizer.decode(ref)
    assert final.text == full[:full.index(stop)]


def test_logprobs_match_the_model_distribution(ckpt):
    folder, oracle = ckpt
    llm = engine(folder)
    prompt = random_prompts([6], seed=12)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0]
    logp = oracle.log_softmax(prompt + out.token_ids)  # [T, V]
    assert len(out.logprobs) == 6
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == token and lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    none = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert none.logprobs is None


def test_seeded_sampling_is_reproducible_in_any_batch(ckpt):
    folder, _ = ckpt
    prompt = random_prompts([5], seed=13)[0]
    others = random_prompts([3, 8, 11], seed=14)
    seeded = SamplingParams(temperature=1.0, top_k=50, max_tokens=8, seed=1234, ignore_eos=True)
    alone = engine(folder).generate([prompt], seeded, use_tqdm=False)[0].token_ids
    free = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    crowd = engine(folder).generate(others[:2] + [prompt] + others[2:], [free, free, seeded, free],
                                    use_tqdm=False)[2].token_ids
    other_seed = SamplingParams(temperature=1.0, top_k=50, max_tokens=8, seed=4321, ignore_eos=True)
    different = engine(folder).generate([prompt], other_seed, use_tqdm=False)[0].token_ids
    assert alone == crowd
    assert alone != different


def test_abort_and_max_model_len(ckpt):
    folder, oracle = ckpt
    prompts = random_prompts([4, 6, 5], seed=15)
    llm = LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    llm.step()
    llm.step()
    assert llm.abort(ids[0]) and llm.abort(ids[2])  # one running, one still waiting
    assert not llm.abort(ids[0])
    finished = []
    while llm.has_unfinished():
        finished += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in finished] == [ids[1]]
    assert finished[0].token_ids == oracle.greedy(prompts[1], N)
    assert llm.block_manager.num_free_blocks == 64

    short = LLM(folder, dtype=torch.float32, num_blocks=64, block_size=4, max_model_len=9)
    out = short.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(prompts[1]) + len(out.token_ids) == 9 and out.finish_reason == "length"
    assert out.token_ids == oracle.greedy(prompts[1], N)[:3]


def test_input_errors_name_the_problem(ckpt):
    folder, _ = ckpt
    llm = engine(folder)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        llm.add_request([1, 999])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request(list(range(1, 200)) * 2)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([[1], [2]], [SamplingParams()], use_tqdm=False)
    model = dsv3.load_model(folder, dtype=torch.float32, progress=False)
    bare = LLM(model, num_blocks=8, block_size=4)  # no tokenizer
    with pytest.raises(ValueError, match="need a tokenizer"):
        bare.add_request("w1 w2")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        bare.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_model_len must be in"):
        LLM(model, num_blocks=2, block_size=4, max_model_len=100)
