"""`dsv3 plot`: PNGs of real (tiny) runs with the expected panels, checked through the figures' axes titles and
the lines they hold (not pixels); bad input is one line naming the file."""

import json

import pytest

from dsv3.cli import main
from dsv3.train.plots import plot_runs, read_run
from dsv3.train.trainer import train
from test_train_shared import make_shards, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_runs")
    data = make_shards(root / "data")
    train(tiny_config(steps=4, eval_every=2), data, root / "a")
    train(tiny_config(steps=3, eval_every=3, batch_size=2, lr=1e-3), data, root / "b")
    return root


def test_plot_writes_the_panels_of_every_run(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "a"), str(runs / "b"), "--output", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out.split()
    for panel in ("loss", "lr", "throughput", "expert_load"):
        assert (tmp_path / "p" / f"{panel}.png").stat().st_size > 10_000 and str(tmp_path / "p" / f"{panel}.png") in printed

    rows = {"a": read_run(runs / "a"), "b": read_run(runs / "b")}
    figures = plot_runs(rows, tmp_path / "q")
    titles = {panel: [ax.get_title() for ax in fig.axes if ax.get_title()] for panel, (_, fig) in figures.items()}
    assert titles["loss"] == ["Cross-entropy over optimizer steps", "Cross-entropy over training tokens"]
    assert titles["lr"] == ["Learning rate"]
    assert titles["throughput"] == ["Tokens per second", "Model FLOPs utilization (MFU)"]
    assert titles["expert_load"] == ["a: most loaded expert / mean per MoE layer",
                                     "a: least loaded expert / mean per MoE layer",
                                     "b: most loaded expert / mean per MoE layer",
                                     "b: least loaded expert / mean per MoE layer"]
    steps_ax, tokens_ax = figures["loss"][1].axes[:2]
    labels = [line.get_label() for line in steps_ax.lines]
    assert labels == ["a train CE", "a MTP CE", "a val CE", "b train CE", "b MTP CE", "b val CE"]
    # the curves are the logged values: run b's train CE over tokens
    b_ce = tokens_ax.lines[3]
    assert list(b_ce.get_xdata()) == [r["tokens"] for r in rows["b"]]
    assert list(b_ce.get_ydata()) == pytest.approx([r["ce"] for r in rows["b"]])
    lr_line = figures["lr"][1].axes[0].lines[0]
    assert list(lr_line.get_ydata()) == pytest.approx([r["lr"] for r in rows["a"]])
    heat = figures["expert_load"][1].axes[0].images[0].get_array()
    assert heat.shape == (len(rows["a"][0]["load_max_per_layer"]), len(rows["a"]))  # MoE layers x steps
    assert heat[:, -1].tolist() == pytest.approx(rows["a"][-1]["load_max_per_layer"])
    # one run: next to it by default
    assert main(["plot", str(runs / "b")]) == 0 and (runs / "b" / "plots" / "loss.png").is_file()


def test_plot_errors_are_one_line(runs, tmp_path, capsys):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    good = (runs / "a" / "metrics.jsonl").read_text().splitlines()
    metrics.write_text("\n".join(good) + '\n{"step": 5, "ce"')  # a row cut short by a kill: dropped
    assert [r["step"] for r in read_run(metrics.parent)] == [1, 2, 3, 4]
    metrics.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    capsys.readouterr()
    assert main(["plot", str(metrics.parent)]) == 1
    assert capsys.readouterr().err.strip() == f"dsv3 plot: error: {metrics}:2: not a metrics row (JSON with a 'step')"
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"dsv3 plot: error: run {tmp_path / 'missing'} not found"
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "empty/metrics.jsonl: not found" in capsys.readouterr().err
    # a step written twice (an old resume) keeps its last row
    metrics.write_text("\n".join([good[0], good[1], json.dumps({**json.loads(good[1]), "ce": 1.5})]) + "\n")
    assert [r["ce"] for r in read_run(metrics)][1] == 1.5
