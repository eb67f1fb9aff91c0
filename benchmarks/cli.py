"""Benchmark: how long `dsv3 --help` (and each verb's `--help`) takes from a cold process, against two peers
measured in the same run: the bare interpreter (`python -c pass`, the floor) and `python -c "import torch"`
(what every `--help` cost while the parser imported torch). Target: under 1.5 s for `dsv3 --help` on the
2-core CPU box. One JSON line per case with the median and spread over `--repeats` runs (cases interleaved
so machine load hits them alike), the ratio to the torch-import peer and whether the target is met.

    python benchmarks/cli.py
    python benchmarks/cli.py --repeats 9 --verbs generate chat
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

TARGET_S = 1.5


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="runs per case (default 7)")
    p.add_argument("--verbs", nargs="*", default=["generate", "chat", "serve", "eval", "sft"],
                   help="verbs whose --help is timed too (default: generate chat serve eval sft)")
    args = p.parse_args(argv)
    py = sys.executable
    cases = {"python -c pass": [py, "-c", "pass"],
             "python -c 'import torch'": [py, "-c", "import torch"],
             "dsv3 --help": [py, "-m", "dsv3", "--help"]}
    cases.update({f"dsv3 {v} --help": [py, "-m", "dsv3", v, "--help"] for v in args.verbs})
    for cmd in cases.values():  # warm the page cache (first imports read .pyc files from disk)
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, cmd in cases.items():
            times[name].append(wall(cmd))
    torch_s = statistics.median(times["python -c 'import torch'"])
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"case": name, "median_s": round(med, 3), "min_s": round(min(ts), 3), "max_s": round(max(ts), 3),
               "repeats": len(ts), "vs_import_torch": round(med / torch_s, 3)}
        if name.startswith("dsv3"):
            row["target_s"], row["met"] = TARGET_S, med < TARGET_S
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
