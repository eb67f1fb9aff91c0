"""GSM8K answer extraction, greedy generation on the engine against a no-cache argmax loop, and the HumanEval
sandbox."""

from __future__ import annotations

import math
import os

import pytest
import torch

from dsv3.eval.generation import (GreedyGenerator, cut_at_stop, evaluate_gsm8k, evaluate_humaneval,
                                  extract_gsm8k_answer, gsm8k_match, humaneval_program, normalize_number,
                                  pass_at_k, run_programs)
from dsv3.engine.config import EngineConfig
from dsv3.eval.tasks import Gsm8kItem, HumanEvalItem
from test_eval_support import HUMANEVAL_PROBLEMS, tiny_model


# ---- GSM8K ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18. So the answer is 18.", "18"),
    ("So the answer is $1,234.00.", "1234"),
    ("It was - 3 degrees in the morning. So the answer is - 3.", "-3"),
    ("The answer is: 0.50", "0.5"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("He has 5 apples, then 7 more, 12 in all", "12"),  # no marker: the last number
    ("I do not know", None),
    ("The answer is 4, not 5. Wait, the answer is 6.", "6"),  # the last "answer is" wins
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_match_compares_numbers_by_value():
    assert normalize_number("1,000") == normalize_number("1000.0") == "1000"
    assert gsm8k_match("So the answer is 1,000.", "1000")
    assert not gsm8k_match("So the answer is 100.", "1000")
    assert not gsm8k_match("no number here", "7")


def test_evaluate_gsm8k_counts_exact_matches():
    items = [Gsm8kItem("0", "Q: a\nAnswer:", "18"), Gsm8kItem("1", "Q: b\nAnswer:", "7"),
             Gsm8kItem("2", "Q: c\nAnswer:", "1200")]
    canned = {"Q: a\nAnswer:": " 9 * 2 = 18. So the answer is 18.", "Q: b\nAnswer:": " So the answer is 8.",
              "Q: c\nAnswer:": " That is $1,200 in all."}
    seen = {}

    def fake_generate(prompts, max_new_tokens, stop):
        seen["args"] = (max_new_tokens, list(stop))
        return [canned[p] for p in prompts]

    metrics, records = evaluate_gsm8k(fake_generate, items, max_new_tokens=77)
    assert seen["args"] == (77, ["Question:", "\n\n"])
    assert [r["correct"] for r in records] == [True, False, True]
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["n"] == 3


# ---- greedy generation ------------------------------------------------------------------------
@torch.no_grad()
def argmax_loop(model, tok, prompt: str, n: int) -> str:
    """Oracle: full forward over the whole sequence (no cache) at every step, argmax, stop at EOS."""
    ids = tok.encode(prompt)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_generation_matches_no_cache_argmax():
    from dsv3.engine import LLM

    model, tok = tiny_model()
    prompts = ["The quick brown fox", "Question: What is the capital of France?\nAnswer:"]
    gen = GreedyGenerator(model, tok, progress=False, config=EngineConfig(num_blocks=64, block_size=4))
    assert isinstance(gen.llm, LLM) and gen.llm.runner.num_blocks == 64  # the engine, with the config given
    expected = [argmax_loop(model, tok, p, 12) for p in prompts]
    assert gen(prompts, 12) == expected
    # a stop string taken from the expected text cuts the output right before it
    stop = expected[0][3:5]
    assert stop and gen(prompts[:1], 12, [stop]) == [cut_at_stop(expected[0], [stop])]
    assert len(gen(prompts[:1], 12, [stop])[0]) < len(expected[0])


def test_long_prompt_keeps_bos_and_tail():
    model, tok = tiny_model()
    gen = GreedyGenerator(model, tok, max_len=32, progress=False, config=EngineConfig(num_blocks=16))
    ids = gen._prompt_ids("The quick brown fox jumps over the lazy dog. " * 10, 24)
    full = tok.encode("The quick brown fox jumps over the lazy dog. " * 10)
    assert len(ids) == 24 and ids[0] == tok.bos_id and ids[1:] == full[-23:]
    with pytest.raises(ValueError, match="below the window"):
        gen(["x"], 32)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["zz"]) == "abc"


# ---- sandbox ----------------------------------------------------------------------------------
def test_sandbox_limits_and_evaluator_survives(tmp_path):
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    programs = {
        "correct": "def f(x):\n    return x + 1\nassert f(1) == 2\n",
        "wrong": "def f(x):\n    return x - 1\nassert f(1) == 2\n",
        "infinite_loop": "while True:\n    pass\n",
        "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 2**20))\n",
        "write_outside": f"open({str(outside)!r}, 'w').write('x')\n",
        "remove_outside": f"import os\nos.remove({str(keep)!r})\n",
        "shell_escape": f"import os\nos.system('touch {outside}')\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])\n",
        "write_inside": "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n",
    }
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=1.5, memory_mb=256, workers=4)))
    assert results["correct"].status == "passed"
    assert results["wrong"].status == "failed" and "AssertionError" in results["wrong"].stderr
    assert results["infinite_loop"].status == "timeout" and results["infinite_loop"].seconds < 5
    assert results["memory_bomb"].status == "memory"
    for name in ("write_outside", "remove_outside", "shell_escape", "subprocess"):
        assert results[name].status == "failed" and "sandbox" in results[name].stderr, name
    assert results["write_inside"].status == "passed"
    assert not outside.exists() and keep.read_text() == "precious"
    # this process is alive and runs the next program normally
    assert run_programs(["print('still here')"], timeout=5)[0].passed


def test_child_gets_the_limits():
    code = ("import resource, os\n"
            "assert resource.getrlimit(resource.RLIMIT_AS)[0] == 300 * 2**20\n"
            "assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 4\n"
            "assert os.getpgid(0) == os.getpid()\n"  # own session / process group
            f"assert os.getppid() == {os.getpid()}\n")
    assert run_programs([code], timeout=3, memory_mb=300)[0].status == "passed"


def test_run_programs_rejects_bad_limits():
    with pytest.raises(ValueError, match="timeout"):
        run_programs(["pass"], timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_programs(["pass"], memory_mb=8)


# ---- HumanEval --------------------------------------------------------------------------------
def test_evaluate_humaneval_runs_completions_against_tests():
    items = [HumanEvalItem(p["task_id"], p["prompt"], p["test"], p["entry_point"], p["canonical_solution"])
             for p in HUMANEVAL_PROBLEMS]
    completions = {items[0].prompt: "    return a + b\n", items[1].prompt: "    return x * 3\n"}

    def fake_generate(prompts, max_new_tokens, stop):
        assert "\ndef" in stop and "\nclass" in stop
        return [completions[p] for p in prompts]

    metrics, records = evaluate_humaneval(fake_generate, items, timeout=5, workers=2, progress=False)
    assert [r["status"] for r in records] == ["passed", "failed"]
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["n"] == 2
    program = humaneval_program(items[0], "    return a + b\n")
    assert program.startswith(items[0].prompt + "    return a + b\n") and program.endswith("check(add)\n")


@pytest.mark.parametrize("n,c,k", [(1, 1, 1), (1, 0, 1), (10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 4, 2)])
def test_pass_at_k_equals_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
