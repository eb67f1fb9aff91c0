"""`dsv3 eval` end to end on a tiny checkpoint and synthetic package files (through `dsv3.cli.main`); flag
errors as one line before the model loads; the results table."""

from __future__ import annotations

import json

import pytest

from dsv3.cli import main
from dsv3.cli.eval import parse_tasks
from dsv3.cli.flags import UsageError
from dsv3.eval.generation import cut_at_stop
from dsv3.eval.harness import markdown_table
from dsv3.eval.perplexity import evaluate_perplexity
from dsv3.eval.tasks import load_task
from test_eval_generation import argmax_loop
from test_eval_support import CORPUS, tiny_checkpoint, tiny_model, write_eval_packages


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "val.jsonl"
    docs = [CORPUS[:700], CORPUS[700:1900], CORPUS[1900:2500]]
    text.write_text("".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in docs), encoding="utf-8")
    return tiny_checkpoint(), write_eval_packages(root / "packages"), text, docs


def test_eval_end_to_end(setup, tmp_path, capsys):
    model_dir, data_dir, text, docs = setup
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--tasks", "ppl,hellaswag,winogrande,mmlu,lambada,gsm8k,humaneval,needle",
            "--limit", "2", "--output", str(out), "--dtype", "float32", "--device", "cpu", "--data-dir", str(data_dir),
            "--text", str(text), "--max-length", "256", "--stride", "100", "--max-new-tokens", "6",
            "--needle-lengths", "128,256", "--needle-depths", "0,1", "--needle-trials", "1", "--no-progress",
            "--num-blocks", "256"]
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    results = saved["results"]
    assert list(results) == ["ppl", "hellaswag", "winogrande", "mmlu", "lambada", "gsm8k", "humaneval", "needle"]
    # ppl reads the first --limit documents and equals the library call with the same window
    model, tok = tiny_model()
    direct = evaluate_perplexity(model, tok, docs[:2], max_len=256, stride=100, progress=False)
    assert results["ppl"]["documents"] == 2
    assert results["ppl"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    assert results["hellaswag"]["n"] == 2 and 0 <= results["hellaswag"]["acc"] <= 1
    assert "acc_norm" in results["hellaswag"] and "acc_norm" not in results["winogrande"]
    assert results["mmlu"]["n"] == 3  # --limit is per subject: 2 anatomy + 1 college physics
    assert results["gsm8k"]["n"] == 2 and results["humaneval"]["n"] == 2
    assert results["needle"]["n"] == 2 * 2
    assert saved["config"]["window"] == 256 and saved["config"]["tasks"][0] == "ppl"
    assert (saved["config"]["dtype"], saved["config"]["device"]) == ("float32", "cpu")
    for name in ("results.md", "needle.png", "needle.json", "hellaswag_samples.jsonl", "humaneval_samples.jsonl"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| ppl | bits_per_byte |" in table and "| humaneval | pass@1 |" in table
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out  # the same table is printed
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [s["status"] in ("passed", "failed", "timeout", "memory") for s in samples] == [True, True]
    # GSM8K generations are the greedy completions of the prompts, cut at the first stop string
    items = load_task("gsm8k", str(data_dir), 2)
    assert all(len(tok.encode(it.prompt)) <= 256 - 6 for it in items)  # no prompt was shortened to fit
    want = [cut_at_stop(argmax_loop(model, tok, it.prompt, 6), it.stop) for it in items]
    gsm = [json.loads(line) for line in (out / "gsm8k_samples.jsonl").read_text().splitlines()]
    assert [g["generation"] for g in gsm] == want


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "hellaswg"], "unknown task"),
    (["--tasks", "ppl"], "--text"),
    (["--tasks", "piqa", "--limit", "0"], "--limit"),
    (["--tasks", "piqa", "--dtype", "fp8"], "--dtype"),
    (["--tasks", "piqa", "--device", "gpu"], "--device"),
    (["--tasks", "piqa", "--max-length", "64", "--stride", "100"], "--stride"),
    (["--tasks", "piqa", "--exec-timeout", "0"], "--exec-timeout"),
    (["--tasks", "needle", "--needle-depths", "0,2"], "--needle"),
    (["--tasks", "piqa", "--engine", "simple"], "unrecognized arguments: --engine"),  # generation is the engine's
])
def test_bad_flags_fail_before_loading(setup, argv, message, tmp_path, capsys):
    model_dir, data_dir, text, _ = setup
    extra = ["--text", str(text)] if "needle" in argv else []
    capsys.readouterr()
    # a model folder that does not exist: the flag error is reported first, so the checks come before loading
    assert main(["eval", "--model", str(tmp_path / "not-a-model"), "--data-dir", str(data_dir), *extra, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsv3 eval: error:") and message in err, err


def test_missing_paths(setup, tmp_path, capsys):
    model_dir, data_dir, text, _ = setup
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa", "--data-dir", str(tmp_path / "none")]) == 2
    assert "fetch_eval_data.sh" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--tasks", "piqa", "--data-dir", str(data_dir)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_parse_tasks_and_table():
    assert parse_tasks("all")[0] == "ppl" and "needle" in parse_tasks("all")
    assert parse_tasks("piqa, mmlu,piqa") == ["piqa", "mmlu"]
    with pytest.raises(UsageError, match="unknown task"):
        parse_tasks("piqa,nope")
    table = markdown_table({"piqa": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.05,
                                     "n": 4, "seconds": 1.0}})
    assert table.splitlines()[2:] == ["| piqa | acc | 0.5000 | 0.1000 | 4 |", "| piqa | acc_norm | 0.2500 | 0.0500 | 4 |"]


def test_plain_eval_needs_no_text_and_finds_the_fetched_data(setup, tmp_path, monkeypatch):
    """Without --tasks every default task that reads package files runs (ppl joins with --text); the default
    --data-dir is the checkout's data/eval-packages, where .ci/fetch_eval_data.sh writes, from any folder."""
    from pathlib import Path

    import dsv3
    from dsv3.cli import build_parser
    from dsv3.cli.eval import DEFAULT_TASKS, check
    from dsv3.eval.tasks import DEFAULT_DATA_DIR

    _, data_dir, text, _ = setup
    parse = build_parser(["eval"]).parse_args
    tasks = check(parse(["eval", "--data-dir", str(data_dir)]))[0]
    assert tasks == [t for t in DEFAULT_TASKS.split(",") if t != "ppl"]
    assert check(parse(["eval", "--data-dir", str(data_dir), "--text", str(text)]))[0] == DEFAULT_TASKS.split(",")
    monkeypatch.chdir(tmp_path)
    assert DEFAULT_DATA_DIR == Path(dsv3.__file__).resolve().parents[1] / "data" / "eval-packages"
    assert parse(["eval"]).data_dir == str(DEFAULT_DATA_DIR)
    with pytest.raises(UsageError, match="--include-path and --num-fewshot apply to --harness lm-eval"):
        main_args = parse(["eval", "--num-fewshot", "2", "--data-dir", str(data_dir)])
        main_args.run(main_args)
