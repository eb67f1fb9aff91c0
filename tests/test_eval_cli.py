"""`dsv3 eval` end to end on a tiny checkpoint and synthetic package files; flag errors before loading."""

from __future__ import annotations

import argparse
import json

import pytest

from dsv3.eval.cli import add_parser, markdown_table, parse_tasks
from dsv3.eval.perplexity import evaluate_perplexity
from test_eval_support import CORPUS, tiny_checkpoint, tiny_model, write_eval_packages


def parse(argv):
    parser = argparse.ArgumentParser(prog="dsv3")
    add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["eval", *argv])


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
    args = parse(["--model", str(model_dir), "--tasks", "ppl,hellaswag,winogrande,mmlu,lambada,gsm8k,humaneval,needle",
                  "--limit", "2", "--output", str(out), "--dtype", "fp32", "--data-dir", str(data_dir),
                  "--text", str(text), "--max-length", "256", "--stride", "100", "--max-new-tokens", "6",
                  "--needle-lengths", "128,256", "--needle-depths", "0,1", "--needle-trials", "1", "--no-progress"])
    assert args.func(args) == 0
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
    for name in ("results.md", "needle.png", "needle.json", "hellaswag_samples.jsonl", "humaneval_samples.jsonl"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| ppl | bits_per_byte |" in table and "| humaneval | pass@1 |" in table
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out  # the same table is printed
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [s["status"] in ("passed", "failed", "timeout", "memory") for s in samples] == [True, True]


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "hellaswg"], "unknown task"),
    (["--tasks", "ppl"], "--text"),
    (["--tasks", "piqa", "--limit", "0"], "--limit"),
    (["--tasks", "piqa", "--dtype", "fp8"], "--dtype"),
    (["--tasks", "piqa", "--device", "gpu"], "--device"),
    (["--tasks", "piqa", "--max-length", "64", "--stride", "100"], "--stride"),
    (["--tasks", "piqa", "--exec-timeout", "0"], "--exec-timeout"),
    (["--tasks", "needle", "--needle-depths", "0,2"], "--needle"),
])
def test_bad_flags_fail_before_loading(setup, argv, message, tmp_path):
    model_dir, data_dir, text, _ = setup
    extra = ["--text", str(text)] if "needle" in argv else []
    args = parse(["--model", str(tmp_path / "not-a-model"), "--data-dir", str(data_dir), *extra, *argv])
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        args.func(args)


def test_missing_paths(setup, tmp_path):
    model_dir, data_dir, text, _ = setup
    args = parse(["--model", str(model_dir), "--tasks", "piqa", "--data-dir", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match="fetch_eval_data.sh"):
        args.func(args)
    args = parse(["--model", str(tmp_path), "--tasks", "piqa", "--data-dir", str(data_dir)])
    with pytest.raises(FileNotFoundError, match="config.json"):
        args.func(args)


def test_parse_tasks_and_table():
    assert parse_tasks("all")[0] == "ppl" and "needle" in parse_tasks("all")
    assert parse_tasks("piqa, mmlu,piqa") == ["piqa", "mmlu"]
    table = markdown_table({"piqa": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.05,
                                     "n": 4, "seconds": 1.0}})
    assert table.splitlines()[2:] == ["| piqa | acc | 0.5000 | 0.1000 | 4 |", "| piqa | acc_norm | 0.2500 | 0.0500 | 4 |"]


def test_every_flag_has_help_and_default():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["eval"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
