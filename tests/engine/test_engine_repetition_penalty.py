"""The repetition penalty, as HF and vLLM define it: every token of the prompt and of the generated text
has its logit divided by the penalty when positive and multiplied by it when negative. Oracles:
`transformers`' own `RepetitionPenaltyLogitsProcessor` on the sampler's logits, and `transformers`' greedy
`generate(repetition_penalty=...)` on the engine's output."""

import pytest
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.sampling import Sampler, processed_logits
from engine_fixtures import Oracle, random_prompts


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_sampler_equals_transformers_processor(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    prompts = [[1, 2, 3, 2], [7], []]
    outputs = [[4, 1], [], [9, 9, 11]]
    params = [SamplingParams(temperature=0, repetition_penalty=penalty)] * 3
    got = processed_logits(logits, params, outputs, prompt_token_ids=prompts)
    for b in range(3):
        ids = torch.tensor([prompts[b] + outputs[b]], dtype=torch.long)
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[b:b + 1].clone())[0]
        torch.testing.assert_close(got[b], want, rtol=0, atol=0)


def test_order_repetition_then_presence_and_frequency():
    """vLLM's order: the repetition penalty on the raw logits, then the OpenAI subtractions (generated
    tokens only); a plain per-token reference."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt, output = [0, 1], [3, 3, 4]
    p = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.25, frequency_penalty=0.5)
    want = []
    for t, x in enumerate(logits[0].tolist()):
        if t in prompt + output:
            x = x / 1.5 if x > 0 else x * 1.5
        count = output.count(t)
        want.append(x - 0.25 * (count > 0) - 0.5 * count)
    got = processed_logits(logits, [p], [output], prompt_token_ids=[prompt])[0]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)


def test_penalty_one_changes_nothing_and_bad_values_are_refused():
    logits = torch.randn(1, 20)
    out = Sampler()(logits, [SamplingParams(temperature=0, repetition_penalty=1.0)], [[3]], prompt_token_ids=[[5]])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert not SamplingParams(repetition_penalty=1.0).has_penalties
    for bad in (0.0, -1.0, 11.0, True):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)


def test_engine_greedy_equals_transformers_generate(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle = Oracle(tmp_path)
        llm = LLM(tmp_path, dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=4)
        prompts = random_prompts([5, 9, 3], seed=1)
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.8)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        for prompt, out in zip(prompts, outputs):
            with torch.no_grad():
                want = oracle.hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                          repetition_penalty=1.8)[0, len(prompt):].tolist()
            assert out.token_ids == want
        assert [o.token_ids for o in outputs] != [o.token_ids for o in plain]  # the penalty was applied
    finally:
        torch.set_num_threads(threads)


def test_server_passes_repetition_penalty(tmp_path):
    """`repetition_penalty` in a /v1/completions request (vLLM's extension) reaches the sampler: the answer
    equals the engine's own with that penalty, and differs from the answer without it; a bad value is a 400."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dsv3.serve.app import create_app
    from engine_fixtures import write_word_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Oracle(tmp_path)
        write_word_tokenizer(tmp_path)
        llm = LLM(tmp_path, dtype=torch.float32, num_blocks=64, block_size=4, max_num_seqs=4)
        prompt = "w5 w9 w3 w5 w9"
        want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                     repetition_penalty=2.0), use_tqdm=False)[0].text
        plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)[0].text
        assert want != plain
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        with TestClient(create_app(llm, served_model_name="tiny", allowed_hosts=["testserver"])) as client:
            got = client.post("/v1/completions", json={**body, "repetition_penalty": 2.0})
            assert got.status_code == 200, got.text
            assert got.json()["choices"][0]["text"] == want
            bad = client.post("/v1/completions", json={**body, "repetition_penalty": 0})
            assert bad.status_code == 400 and "repetition_penalty" in bad.text
    finally:
        torch.set_num_threads(threads)
