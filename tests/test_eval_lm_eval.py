"""The lm-evaluation-harness backend: lm-eval runs tasks defined in local YAML over local JSON lines (no hub) on
the `dsv3` model, and its scores equal dsv3 eval's own on the same items: multiple choice (acc, acc_norm and
every option's log-likelihood), rolling log-likelihood (bits per byte) and generation (the engine's greedy
text). `dsv3 eval --harness lm-eval` writes the harness's results."""

import json
import math
import re

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install -e '.[lm-eval]'")

from dsv3.cli import main  # noqa: E402
from dsv3.eval.generation import GreedyGenerator  # noqa: E402
from dsv3.eval.lm_eval_backend import DSV3LM  # noqa: E402
from dsv3.eval.multiple_choice import evaluate_choice  # noqa: E402
from dsv3.eval.perplexity import evaluate_perplexity  # noqa: E402
from dsv3.eval.tasks import ChoiceItem  # noqa: E402
from test_eval_support import tiny_checkpoint, tiny_model  # noqa: E402
from test_train_shared import real_documents  # noqa: E402

N_ITEMS = 12


def _sentences() -> list[str]:
    text = " ".join(real_documents())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 6 <= len(s.split()) <= 20]
    return list(dict.fromkeys(found))


def _choice_docs() -> list[dict]:
    """Real sentences cut in two: the context is the first half, the options the true second half and three
    other sentences' second halves, the gold one at a rotating place."""
    sentences = _sentences()[:N_ITEMS + 3]
    halves = [(" ".join(s.split()[:len(s.split()) // 2]), " ".join(s.split()[len(s.split()) // 2:]))
              for s in sentences]
    docs = []
    for i in range(N_ITEMS):
        gold = i % 4
        others = [halves[(i + k) % len(halves)][1] for k in (1, 2, 3)]
        choices = others[:gold] + [halves[i][1]] + others[gold:]
        docs.append({"id": str(i), "context": halves[i][0], "choices": choices, "gold": gold})
    return docs


def _write_tasks(folder, docs, texts, prompts) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("choice", docs), ("text", [{"text": t} for t in texts]),
                       ("gen", [{"prompt": p, "answer": "x"} for p in prompts])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ntest_split: test\n"
    (folder / "choice.yaml").write_text(
        f"task: dsv3_local_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "text.yaml").write_text(
        f"task: dsv3_local_text\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        f"task: dsv3_local_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = _choice_docs()
    texts = _sentences()[20:26]
    prompts = [" ".join(s.split()[:5]) for s in _sentences()[30:36]]
    _write_tasks(folder, docs, texts, prompts)
    return folder, docs, texts, prompts


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _evaluate(lm, folder, names):
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder)),
                                   log_samples=True, bootstrap_iters=0)


def test_lm_eval_backend_equals_dsv3_eval(tasks):
    folder, docs, texts, prompts = tasks
    model, tok = tiny_model()
    out = _evaluate(DSV3LM(model=model, tokenizer=tok, batch_size=4, progress=False), folder,
                    ["dsv3_local_choice", "dsv3_local_text", "dsv3_local_gen"])

    items = [ChoiceItem(d["id"], [d["context"]] * 4, [" " + c for c in d["choices"]], d["choices"], d["gold"])
             for d in docs]
    ours, records = evaluate_choice(model, tok, items, batch_size=3, progress=False)
    theirs = out["results"]["dsv3_local_choice"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    samples = sorted(out["samples"]["dsv3_local_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == N_ITEMS
    for sample, record in zip(samples, records):
        lls = [resp[0][0] for resp in sample["resps"]]
        assert lls == pytest.approx(record["logprobs"], abs=1e-4)

    ppl = evaluate_perplexity(model, tok, texts, max_len=model.args.max_seq_len, progress=False)
    assert out["results"]["dsv3_local_text"]["bits_per_byte,none"] == pytest.approx(ppl.bits_per_byte, rel=1e-5)

    expected = GreedyGenerator(model, tok, progress=False)(prompts, 6, ["."])
    generated = [s["resps"][0][0] for s in sorted(out["samples"]["dsv3_local_gen"], key=lambda s: s["doc_id"])]
    assert generated == expected


def test_registered_as_dsv3_and_the_cli(tasks, tmp_path, capsys):
    folder, docs, _, _ = tasks
    from lm_eval.api.registry import get_model
    assert get_model("dsv3") is DSV3LM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still found beside it
    ckpt = tiny_checkpoint()
    out_dir = tmp_path / "out"
    assert main(["eval", "--harness", "lm-eval", "--tasks", "dsv3_local_choice", "--include-path", str(folder),
                 "--model", str(ckpt), "--output", str(out_dir), "--no-progress", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "dsv3_local_choice" in printed and "acc" in printed
    saved = json.loads((out_dir / "results.json").read_text())
    model, tok = tiny_model()
    items = [ChoiceItem(d["id"], [d["context"]] * 4, [" " + c for c in d["choices"]], d["choices"], d["gold"])
             for d in docs]
    ours, _ = evaluate_choice(model, tok, items, progress=False)
    assert saved["results"]["dsv3_local_choice"]["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    from lm_eval.tasks import TaskManager  # by name, as lm-eval builds its own models
    by_name = lm_eval.simple_evaluate(model="dsv3", model_args=f"pretrained={ckpt},dtype=float32,progress=False",
                                      tasks=["dsv3_local_choice"], task_manager=TaskManager(include_path=str(folder)),
                                      device="cpu", batch_size=4, bootstrap_iters=0)
    assert by_name["results"]["dsv3_local_choice"]["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    capsys.readouterr()
    assert main(["eval", "--harness", "lm-eval", "--tasks", "no_such_task", "--include-path", str(folder),
                 "--model", str(ckpt), "--output", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3 eval: error: lm-eval has no task(s) no_such_task")
    assert math.isfinite(ours["acc"])
