"""MTP speculative decoding inside the engine (`LLM(speculative="mtp")`): greedy outputs are token for token those
of the same engine without speculation, under batching, chunked prefill, requests joining mid-flight,
preemption, prefix-cache hits and stop tokens inside accepted drafts; rollback leaves the block manager as a
run without speculation leaves it; the shipped model's real MTP module gets drafts both accepted and rejected.
GPU (`gpu` marker): the same on the fast path (Triton paged attention, CUDA graphs for verify and MTP steps)."""

import pytest
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams

MAX_NEW = 24


@pytest.fixture(scope="module")
def model():
    """The shipped default model: a trained MTP module, so drafts are accepted and rejected."""
    return dsv3.load_model(dsv3.default_model_path(), dtype=torch.float32, progress=False)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 4000, (n - 1,), generator=g).tolist() for n in lengths]


def greedy(n=MAX_NEW, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def pair(model, k, **settings):
    """The same model in an engine without speculation and one with k drafts, same settings."""
    return LLM(model, **settings), LLM(model, speculative="mtp", num_draft_tokens=k, **settings)


def assert_consistent(plain, spec):
    """Every block free again, and the prefix cache holds the same hashes (rejected drafts left no trace)."""
    for llm in (plain, spec):
        bm = llm.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert all(b.ref_count == 0 for b in bm.blocks)
    assert set(plain.block_manager.hash_to_block) == set(spec.block_manager.hash_to_block)
    tokens = {plain.block_manager.blocks[b].token_ids for b in plain.block_manager.hash_to_block.values()}
    assert tokens == {spec.block_manager.blocks[b].token_ids for b in spec.block_manager.hash_to_block.values()}


@pytest.mark.parametrize("k", [1, 3])
def test_batch_of_mixed_lengths_equals_plain_greedy(model, k):
    settings = dict(num_blocks=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    plain, spec = pair(model, k, **settings)
    prompts = prompts_of([3, 13, 7, 22, 1, 9])
    params = [greedy(n) for n in (24, 5, 17, 11, 24, 2)]  # finishing at different steps, some mid-draft
    expected = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason == "length"
    stats = spec.speculative_stats
    assert len(stats.drafted) == k and stats.drafted[0] > 0
    assert 0 < stats.accepted[0] < stats.drafted[0]  # the real MTP module: accepted and rejected drafts
    assert all(a <= d for a, d in zip(stats.accepted, stats.drafted))
    assert stats.drafted == sorted(stats.drafted, reverse=True)  # a later position is only drafted with the earlier
    steps_saved = sum(stats.accepted)
    assert spec.runner.drafter is not None and steps_saved > 0
    assert_consistent(plain, spec)


def test_requests_added_mid_flight_stream_the_same_tokens(model):
    plain, spec = pair(model, 2, num_blocks=96, block_size=4, max_num_seqs=3, max_num_batched_tokens=12)
    prompts = prompts_of([4, 15, 2, 11, 6], seed=1)
    expected = plain.generate(prompts, greedy(), use_tqdm=False)
    ids = {spec.add_request(prompts[0], greedy()): 0}
    streamed, done, step = {}, {}, 0
    while spec.has_unfinished() or len(ids) < len(prompts):
        if step in (1, 2, 4, 7) and len(ids) < len(prompts):
            ids[spec.add_request(prompts[len(ids)], greedy())] = len(ids)
        for out in spec.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                done[out.request_id] = out
        step += 1
    for rid, i in ids.items():
        assert done[rid].token_ids == expected[i].token_ids
        assert streamed[rid] == done[rid].token_ids
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_preemption_with_a_tiny_cache(model):
    # 14 blocks of 4 = 56 tokens; four requests need 30-36 tokens each, and drafts want slots beyond them
    plain, spec = pair(model, 2, num_blocks=14, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = prompts_of([6, 10, 12, 4], seed=2)
    expected = plain.generate(prompts, greedy(), use_tqdm=False)
    got = spec.generate(prompts, greedy(), use_tqdm=False)
    assert spec.num_preemptions > 0
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert spec.block_manager.num_free_blocks == 14


def test_prefix_hits_change_nothing(model):
    plain, spec = pair(model, 2, num_blocks=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    prefix = prompts_of([17], seed=4)[0]
    tails = [t[1:] for t in prompts_of([2, 4, 7], seed=5)]
    runs = []
    for llm in (plain, spec):
        first = llm.generate(prefix + tails[0], greedy(), use_tqdm=False)
        rest = llm.generate([prefix + t for t in tails], greedy(), use_tqdm=False)
        runs.append([o.token_ids for o in first + rest])
        assert all(o.num_cached_tokens >= 16 for o in rest)
    assert runs[0] == runs[1]
    assert spec.prefix_cache_hit_tokens == plain.prefix_cache_hit_tokens >= 3 * 16
    assert_consistent(plain, spec)


def test_stop_token_inside_accepted_drafts_and_logprobs(model):
    plain, spec = pair(model, 3, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    prompts = prompts_of([5, 9], seed=7)
    expected = plain.generate(prompts, greedy(logprobs=2), use_tqdm=False)
    got = spec.generate(prompts, greedy(logprobs=2), use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids
        for le, lg in zip(e.logprobs, g.logprobs):  # the raw log-probability of each kept token, as without drafts
            assert lg.token_id == le.token_id and abs(lg.logprob - le.logprob) < 1e-4
            assert [t for t, _ in lg.top] == [t for t, _ in le.top]
    # stop at a token that comes late in a sequence: the tokens after it in the same step are dropped
    for e, prompt in zip(expected, prompts):
        stop = e.token_ids[-5]
        cut = e.token_ids[: e.token_ids.index(stop) + 1]
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop])
        assert plain.generate(prompt, params, use_tqdm=False)[0].token_ids == cut
        out = spec.generate(prompt, params, use_tqdm=False)[0]
        assert out.token_ids == cut and out.finish_reason == "stop"
    assert spec.block_manager.num_free_blocks == 64


def test_stop_strings_end_at_the_same_token(model):
    """A stop string completed by a token in the middle of a step's kept tokens: the tokens after it are dropped,
    so text and token ids are those of decoding without speculation."""
    path = dsv3.default_model_path()
    settings = dict(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, tokenizer=path)
    plain, spec = pair(model, 3, **settings)
    texts = ["The Linux kernel", "It is a truth universally"]
    free = plain.generate(texts, greedy(), use_tqdm=False)
    for text, out in zip(texts, free):
        words = out.text.split()
        stop = words[len(words) // 2]
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=stop)
        want = plain.generate(text, params, use_tqdm=False)[0]
        got = spec.generate(text, params, use_tqdm=False)[0]
        assert want.finish_reason == got.finish_reason == "stop"
        assert got.token_ids == want.token_ids and got.text == want.text
    assert spec.speculative_stats.accepted[0] > 0
    assert spec.block_manager.num_free_blocks == 64


def test_greedy_and_sampled_sequences_share_steps(model):
    """Temperature 0 and > 0 in one batch: the greedy ones are unchanged, seeded ones repeat exactly."""
    settings = dict(num_blocks=96, block_size=4, max_num_seqs=6, max_num_batched_tokens=32)
    plain, spec = pair(model, 2, **settings)
    prompts = prompts_of([5, 8, 3, 6], seed=9)
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, presence_penalty=0.5, max_tokens=MAX_NEW,
                              ignore_eos=True, seed=s) for s in (1, 2)]
    params = [greedy(), sampled[0], greedy(), sampled[1]]
    expected = plain.generate(prompts, params, use_tqdm=False)
    first = spec.generate(prompts, params, use_tqdm=False)
    again = spec.generate(prompts, params, use_tqdm=False)
    for i in (0, 2):
        assert first[i].token_ids == expected[i].token_ids
    for i in (1, 3):
        assert first[i].token_ids == again[i].token_ids and len(first[i].token_ids) == MAX_NEW


def test_checks_its_settings(model, tmp_path):
    from dsv3.config import ModelArgs
    from dsv3.model import Transformer
    with pytest.raises(ValueError, match="speculative must be one of"):
        LLM(model, num_blocks=8, speculative="eagle")
    with pytest.raises(ValueError, match="num_draft_tokens must be"):
        LLM(model, num_blocks=8, speculative="mtp", num_draft_tokens=0)
    no_mtp = Transformer(ModelArgs.from_preset("tiny").replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        LLM(no_mtp, num_blocks=8, speculative="mtp")
    off = LLM(model, num_blocks=8)
    assert off.speculative_stats is None and off.runner.drafter is None


def test_cli_flags_summary_line_and_metrics(model, tmp_path, capsys):
    """`--speculative mtp --num-draft-tokens K` on generate (same answers, acceptance in the summary line),
    bad combinations refused in one line, and the per-position counters on /metrics."""
    import json

    from dsv3.cli import main
    from dsv3.serve.metrics import ServerMetrics, parse_text, speculative_counts
    src = tmp_path / "prompts.txt"
    src.write_text("The Linux kernel\nIt is a truth universally\n")
    answers = {}
    for extra in ([], ["--speculative", "mtp", "--num-draft-tokens", "2"]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main(["generate", "--input-file", str(src), "--output", str(out), "--max-new-tokens", "12",
                     "--temperature", "0", "--device", "cpu", *extra]) == 0
        answers[len(extra)] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        assert ("acceptance per draft position" in summary) == bool(extra), summary
    assert answers[0] == answers[4]
    assert main(["generate", "--prompt", "x", "--num-draft-tokens", "2", "--device", "cpu"]) == 2
    assert "--num-draft-tokens needs --speculative mtp" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--speculative", "mtp", "--num-draft-tokens", "9",
                 "--device", "cpu"]) == 2
    assert "num_draft_tokens must be <= 8" in capsys.readouterr().err

    llm = LLM(model, num_blocks=32, block_size=4, speculative="mtp", num_draft_tokens=2)
    llm.generate(prompts_of([6]), greedy(10), use_tqdm=False)
    samples = parse_text(ServerMetrics(lambda: speculative_counts(llm)).render())
    stats = llm.speculative_stats
    for i in range(2):
        assert samples[f'dsv3_spec_decode_num_draft_tokens_total{{position="{i}"}}'] == stats.drafted[i]
        assert samples[f'dsv3_spec_decode_num_accepted_tokens_total{{position="{i}"}}'] == stats.accepted[i]
    assert not any("spec_decode" in k for k in parse_text(ServerMetrics(lambda: speculative_counts(
        LLM(model, num_blocks=8))).render()))


@pytest.mark.triton
def test_kernel_backend_keeps_greedy_drafts_on_the_device():
    """The fast path's all-greedy steps (`MTPDrafter.propose_greedy`: acceptance, catch-up and chained drafts on
    the device, one host sync), run eagerly through the kernel backend (the Triton interpreter on a CPU): the same
    tokens as plain greedy, and step by step the same drafts as the host path (`MTPDrafter.propose`), with a
    step that needs the host path (log-probabilities) mixed in. A tiny random model with 8 tokens, so random
    drafts are sometimes accepted."""
    import copy

    from dsv3.config import ModelArgs
    from dsv3.engine.model_runner import ModelRunner
    from dsv3.model import Transformer
    torch.manual_seed(1)
    tiny = Transformer(ModelArgs.from_preset("tiny").replace(vocab_size=8, n_layers=1, init_std=0.1)).eval()
    settings = dict(num_blocks=16, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    prompts = [[3, 1, 4], [5, 2, 6, 7, 1, 0]]
    params = [greedy(8), greedy(3, logprobs=1)]
    expected = LLM(tiny, **settings).generate(prompts, params, use_tqdm=False)
    runs = []
    for fused in (True, False):
        fast_model = copy.deepcopy(tiny)
        llm = LLM(fast_model, speculative="mtp", num_draft_tokens=2, **settings)
        llm.runner = ModelRunner(fast_model, block_size=4, num_blocks=16, fast=True, max_num_seqs=2,
                                 cuda_graphs=False, num_draft_tokens=2)
        drafter = llm.runner.drafter
        assert drafter.fused and set(drafter.graphs) == {0}
        drafter.fused = fused
        calls = []
        real = drafter.propose_greedy
        drafter.propose_greedy = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        seqs = [llm.scheduler.waiting[-1] for p in zip(prompts, params) if llm.add_request(*p) >= 0]
        drafts, done = [], {}
        while llm.has_unfinished():
            for out in llm.step():
                done[out.request_id] = out.token_ids
            drafts.append([list(s.draft_token_ids) for s in seqs])
        assert [done[i] for i in sorted(done)] == [e.token_ids for e in expected]
        assert bool(calls) == fused
        runs.append((drafts, llm.speculative_stats))
        assert llm.block_manager.num_free_blocks == 16
    assert runs[0] == runs[1]  # the same drafts every step, the same acceptance
    assert runs[0][1].accepted[0] > 0 and any(len(d) == 2 for step in runs[0][0] for d in step)


# ---- GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
def test_fast_path_with_graphs_equals_plain_greedy(k):
    gpu_model = dsv3.load_model(dsv3.default_model_path(), device="cuda", dtype=torch.float32, progress=False)
    settings = dict(num_blocks=128, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    plain = LLM(gpu_model, fast=False, **settings)
    prompts = prompts_of([3, 13, 7, 22, 1, 9], seed=11)
    params = [greedy(n) for n in (24, 5, 17, 11, 24, 2)]
    expected = plain.generate(prompts, params, use_tqdm=False)
    fast = LLM(gpu_model, fast=True, speculative="mtp", num_draft_tokens=k, **settings)
    assert fast.runner.graphs is not None and set(fast.runner.drafter.graphs) == {0}
    assert {b * (1 + k) for b in (1, 2, 4)} <= set(fast.runner.graphs.sizes)
    got = fast.generate(prompts, params, use_tqdm=False)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert fast.runner.graph_steps > 0 and fast.runner.drafter.graph_steps > 0
    assert 0 < fast.speculative_stats.accepted[0] < fast.speculative_stats.drafted[0]
    # preemption and prefix hits on the fast path
    small = LLM(gpu_model, fast=True, speculative="mtp", num_draft_tokens=k, num_blocks=14, block_size=4,
                max_num_seqs=4, max_num_batched_tokens=16)
    tiny_prompts = prompts_of([6, 10, 12, 4], seed=2)
    want = plain.generate(tiny_prompts, greedy(), use_tqdm=False)
    assert [o.token_ids for o in small.generate(tiny_prompts, greedy(), use_tqdm=False)] == \
        [o.token_ids for o in want]
    assert small.num_preemptions > 0 and small.block_manager.num_free_blocks == 14
    again = fast.generate(prompts[:3], params[:3], use_tqdm=False)
    assert fast.prefix_cache_hit_tokens > 0 and [o.token_ids for o in again] == [e.token_ids for e in expected[:3]]
