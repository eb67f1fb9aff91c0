"""Run a list of evaluation tasks on one model and write their results: what `dsv3 eval` drives.

`EvalPlan` holds the settings of a run (tasks, window, limits, sandbox limits, needle grid); `evaluate`
runs each task through its evaluator (perplexity, multiple choice, LAMBADA, GSM8K and HumanEval through
a `GreedyGenerator` on the engine, MTP, needle), printing one table row per metric as it goes and writing
per-item samples; `write_results` saves `results.json` and `results.md`. `markdown_table` is the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.eval.tasks import TASKS

TABLE_SKIP = ("n", "seconds", "documents", "nll", "tokens", "bytes")  # in results.json, not in the table
# which metric leads the table for each task kind
HEADLINE = {"ppl": ["bits_per_byte", "byte_perplexity", "token_perplexity"], "choice": ["acc", "acc_norm"],
            "lambada": ["acc", "ppl"], "gsm8k": ["exact_match"], "humaneval": ["pass@1"],
            "needle": ["mean_accuracy"], "mtp": ["mtp_next_next_acc", "next_token_acc", "mtp_agrees_with_greedy"]}


@dataclass
class EvalPlan:
    """Settings of one evaluation run (what the `dsv3 eval` flags hold)."""

    tasks: list[str]
    window: int  # context window in tokens
    stride: int  # ppl sliding-window stride
    text: str | None = None  # held-out text for ppl, mtp and needle
    data_dir: str | None = None  # extracted task packages
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    exec_timeout: float = 5.0
    exec_memory_mb: int = 1024
    exec_workers: int = 4
    needle_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle_trials: int = 4
    progress: bool = True


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """| task | metric | value | stderr | n | for every numeric metric of every task."""
    lines = ["| task | metric | value | ± | n |", "| --- | --- | ---: | ---: | ---: |"]
    for task, metrics in results.items():
        kind = TASKS[task].kind if task in TASKS else ""
        keys = [k for k in HEADLINE.get(kind, []) if k in metrics]
        keys += [k for k, v in metrics.items() if k not in keys and isinstance(v, (int, float))
                 and not k.endswith("_stderr") and k not in TABLE_SKIP]
        n = metrics.get("n", metrics.get("documents", ""))
        for k in keys:
            v = metrics[k]
            err = metrics.get(f"{k}_stderr")
            value = f"{v:.4f}" if isinstance(v, float) else f"{v}"
            lines.append(f"| {task} | {k} | {value} | {'' if err is None else f'{err:.4f}'} | {n} |")
    return "\n".join(lines) + "\n"


def _write_samples(folder: Path, task: str, records: list[dict[str, Any]]) -> None:
    with open(folder / f"{task}_samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_task(task: str, model: Any, tokenizer: Any, generator: Any, plan: EvalPlan, out_dir: Path,
             title: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-item records of one task (the needle task also saves its heat map in `out_dir`)."""
    from dsv3.eval import generation, multiple_choice, needle, perplexity
    from dsv3.eval.tasks import load_task

    kind = TASKS[task].kind
    if kind == "ppl":
        texts = perplexity.read_texts(plan.text, plan.limit)
        return perplexity.evaluate_perplexity(model, tokenizer, texts, max_len=plan.window, stride=plan.stride,
                                              batch_size=plan.batch_size, progress=plan.progress).to_dict(), []
    if kind == "mtp":
        from dsv3.eval.mtp import evaluate_mtp
        return evaluate_mtp(model, tokenizer, perplexity.read_texts(plan.text, plan.limit), max_len=plan.window,
                            progress=plan.progress), []
    if kind == "needle":
        result = needle.run_needle(model, tokenizer, perplexity.read_texts(plan.text), plan.needle_lengths,
                                   plan.needle_depths, trials=min(plan.needle_trials, plan.limit or plan.needle_trials),
                                   batch_size=plan.batch_size, max_len=plan.window, progress=plan.progress)
        needle.save_needle(result, out_dir, title=f"Needle in a haystack: {title}")
        metrics = {"mean_accuracy": result["mean_accuracy"], "n": len(result["trials"]), "lengths": result["lengths"]}
        return metrics, result["trials"]
    items = load_task(task, plan.data_dir, plan.limit)
    if kind == "choice":
        return multiple_choice.evaluate_choice(model, tokenizer, items, max_len=plan.window, batch_size=plan.batch_size,
                                               desc=task, progress=plan.progress, acc_norm=TASKS[task].acc_norm)
    if kind == "lambada":
        return multiple_choice.evaluate_lambada(model, tokenizer, items, max_len=plan.window,
                                                batch_size=plan.batch_size, progress=plan.progress)
    if kind == "gsm8k":
        return generation.evaluate_gsm8k(generator, items, plan.max_new_tokens)
    if kind == "humaneval":
        return generation.evaluate_humaneval(generator, items, plan.max_new_tokens, timeout=plan.exec_timeout,
                                             memory_mb=plan.exec_memory_mb, workers=plan.exec_workers,
                                             progress=plan.progress)
    raise ValueError(f"task {task}: unknown kind {kind!r}")  # the registry only holds the kinds above


def evaluate(model: Any, tokenizer: Any, generator: Any, plan: EvalPlan, out_dir: Path,
             title: str) -> dict[str, dict[str, Any]]:
    """Run every task of `plan` in order; per-item samples go to `out_dir/<task>_samples.jsonl`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for task in plan.tasks:
        start = time.time()
        print(f"[dsv3 eval] {task}: {TASKS[task].description}", flush=True)
        metrics, records = run_task(task, model, tokenizer, generator, plan, out_dir, title)
        metrics["seconds"] = round(time.time() - start, 2)
        results[task] = metrics
        if records:
            _write_samples(out_dir, task, records)
        print("\n".join(markdown_table({task: metrics}).splitlines()[2:]), flush=True)
    return results


def write_results(out_dir: Path, config: dict[str, Any], results: dict[str, dict[str, Any]], title: str) -> str:
    """Write results.json (config and metrics) and results.md (the table); returns the table."""
    table = markdown_table(results)
    (out_dir / "results.json").write_text(json.dumps({"config": config, "results": results}, indent=1),
                                          encoding="utf-8")
    (out_dir / "results.md").write_text(f"# dsv3 eval: {title}\n\n{table}", encoding="utf-8")
    return table
