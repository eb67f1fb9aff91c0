"""Pictures of training runs from their `metrics.jsonl`, with matplotlib: what `dsv3 plot` writes.

`read_run(folder)` reads one run's rows (one per step; a row cut short by a kill at the end is dropped, a bad
row elsewhere is a ValueError naming file and line; a step written twice keeps its last row). `plot_runs`
writes four PNGs for one or several runs, overlaid in one colour per run:

- `loss.png`: train CE (solid), validation CE (dots) and MTP CE (dashed), over optimizer steps and over
  training tokens (runs of different batch sizes line up on tokens);
- `lr.png`: the learning rate;
- `throughput.png`: tokens per second and MFU (MFU is logged on GPUs only);
- `expert_load.png`: per MoE layer (rows) and step (columns), the most and least loaded expert's share as a
  ratio to the mean (1.0 = balanced), one row of two heat maps per run.

Each figure is returned as well, so callers (and tests) can read its axes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PANELS = ("loss", "lr", "throughput", "expert_load")


def read_run(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run folder's `metrics.jsonl` (or of that file), in step order, one per step."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (a run folder written by `dsv3 train` holds metrics.jsonl)")
    lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    rows: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            if n == len(lines):  # the last row, cut short by a kill
                continue
            raise ValueError(f"{file}:{n}: not a metrics row (JSON with a 'step')") from None
    if not rows:
        raise ValueError(f"{file}: no metrics rows yet")
    return [rows[s] for s in sorted(rows)]


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    if not pairs:
        return np.empty(0), np.empty(0)
    xs, ys = zip(*pairs)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (the first points average what there is)."""
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _loss_figure(runs: dict[str, list[dict]], smooth: int):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, x, label in zip(axes, ("step", "tokens"), ("optimizer step", "training tokens")):
        for i, (name, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            xs, ys = _series(rows, "ce", x)
            ax.plot(xs, _smooth(ys, smooth), color=color, lw=1.2, label=f"{name} train CE")
            xs, ys = _series(rows, "mtp", x)
            if len(ys):
                ax.plot(xs, _smooth(ys, smooth), color=color, lw=1.0, ls="--", alpha=0.8, label=f"{name} MTP CE")
            xs, ys = _series(rows, "val_loss", x)
            if len(ys):
                ax.plot(xs, ys, color=color, ls=":", marker="o", ms=4, label=f"{name} val CE")
        ax.set_title(f"Cross-entropy over {label}s" if x == "step" else "Cross-entropy over training tokens")
        ax.set_xlabel(label)
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _lr_figure(runs: dict[str, list[dict]]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name, rows in runs.items():
        ax.plot(*_series(rows, "lr"), label=name)
    ax.set_title("Learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _throughput_figure(runs: dict[str, list[dict]], smooth: int):
    import matplotlib.pyplot as plt
    fig, (tps, mfu) = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True)
    any_mfu = False
    for name, rows in runs.items():
        xs, ys = _series(rows, "tokens_per_s")
        tps.plot(xs, _smooth(ys, smooth), label=name)
        xs, ys = _series(rows, "mfu")
        if len(ys):
            mfu.plot(xs, 100 * _smooth(ys, smooth), label=name)
            any_mfu = True
    tps.set_title("Tokens per second")
    tps.set_ylabel("tokens / s (all ranks)")
    mfu.set_title("Model FLOPs utilization (MFU)")
    mfu.set_ylabel("% of peak")
    if not any_mfu:
        mfu.text(0.5, 0.5, "not logged (CPU runs)", ha="center", va="center", transform=mfu.transAxes)
    for ax in (tps, mfu):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    tps.legend(fontsize=8)
    return fig


def _load_figure(runs: dict[str, list[dict]]):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 3.4 * len(runs)), squeeze=False, constrained_layout=True)
    for (name, rows), (ax_max, ax_min) in zip(runs.items(), axes):
        for ax, key, title, cmap, vmax in ((ax_max, "load_max_per_layer", "most loaded expert / mean", "magma", None),
                                           (ax_min, "load_min_per_layer", "least loaded expert / mean", "viridis",
                                            1.0)):
            have = [r for r in rows if r.get(key)]
            ax.set_title(f"{name}: {title} per MoE layer")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("MoE layer")
            if not have:
                ax.text(0.5, 0.5, "no expert load logged", ha="center", va="center", transform=ax.transAxes)
                continue
            grid = np.asarray([r[key] for r in have], dtype=float).T  # [layers, steps]
            steps = [r["step"] for r in have]
            image = ax.imshow(grid, aspect="auto", interpolation="nearest", origin="lower", cmap=cmap, vmin=0.0,
                              vmax=vmax if vmax is not None else max(2.0, float(grid.max())),
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, grid.shape[0] - 0.5))
            ax.set_yticks(range(grid.shape[0]))
            fig.colorbar(image, ax=ax, label="ratio to the mean load")
    return fig


def plot_runs(runs: dict[str, list[dict]], out_dir: str | Path, smooth: int = 1) -> dict[str, Any]:
    """Write `loss.png`, `lr.png`, `throughput.png` and `expert_load.png` for `runs` (name -> rows) into `out_dir`;
    returns {panel: (path, figure)} (the figures stay open for the caller to inspect or close)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    if not runs:
        raise ValueError("no runs to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"loss": _loss_figure(runs, smooth), "lr": _lr_figure(runs),
               "throughput": _throughput_figure(runs, smooth), "expert_load": _load_figure(runs)}
    written = {}
    for panel, fig in figures.items():
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=110)
        written[panel] = (path, fig)
    return written
