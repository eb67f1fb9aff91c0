"""`dsv3 plot`: PNG pictures of one or several training runs, overlaid.

    dsv3 plot runs/a                      # writes runs/a/plots/{loss,lr,throughput,expert_load}.png
    dsv3 plot runs/a runs/b --output cmp  # both runs in each picture, one colour per run

Each RUN is a folder written by `dsv3 train` (or its `metrics.jsonl`); it may still be training. The
pictures: train, validation and MTP cross-entropy over steps and over tokens; the learning rate; tokens per
second and MFU; and per MoE layer the most and least loaded expert as a ratio to the mean, as heat maps over
steps. The drawing is `dsv3.train.plots`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.cli.flags import RawDescriptionFormatter, UsageError, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = RawDescriptionFormatter
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of `dsv3 train` (or metrics.jsonl files)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="folder for the PNGs (default: RUN/plots for one run, ./plots for several)")
    p.add_argument("--smooth", type=positive_int, default=1, metavar="N",
                   help="trailing mean over N steps for the per-step curves (default: %(default)s, none)")
    p.set_defaults(run=run)


def _names(paths: list[Path]) -> list[str]:
    """A short, distinct label per run: the folder name, with its parent where two names collide."""
    folders = [p.parent if p.is_file() else p for p in paths]
    names = [f.name or str(f) for f in folders]
    if len(set(names)) < len(names):
        names = [f"{f.parent.name}/{f.name}" for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names


def run(args: argparse.Namespace) -> int:
    from dsv3.train.plots import plot_runs, read_run

    paths = [Path(r) for r in args.runs]
    for path in paths:
        if not path.exists():
            raise UsageError(f"run {path} not found")
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise UsageError("a run is named twice")
    runs = {name: read_run(path) for name, path in zip(_names(paths), paths)}
    base = paths[0].parent if paths[0].is_file() else paths[0]
    out = Path(args.output) if args.output else (base / "plots" if len(paths) == 1 else Path("plots"))
    written = plot_runs(runs, out, smooth=args.smooth)
    for panel, (path, _) in written.items():
        print(f"wrote {path}")
    return 0
