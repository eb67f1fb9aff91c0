"""Needle in a haystack: can the model retrieve one fact placed at a given depth of a long context?

For each context length L (tokens) and depth d (0 = start, 1 = end) and each of `trials` random
7-digit numbers, the haystack is the held-out text cut to fit L tokens; the needle sentence
"The special magic number is N." goes in at the sentence boundary nearest before d of the way in, and
the question follows:

    <haystack with needle>\\n\\nQuestion: What is the special magic number mentioned in the text above?
    Answer: The special magic number is| N.

The answer " N." is scored with one forward pass (`score_spans`): `found` = every answer token is the
argmax, which is exactly "greedy decoding writes N." (teacher forcing and greedy decoding see the same
prefixes while they agree), and `logprob` = its log-likelihood. A cell's accuracy is the mean of
`found` over trials (`answer_logprob`: the mean log-likelihood, informative when nothing is found). Results: `needle.json` (every trial, the accuracy grid) and `needle.png` (the
accuracy heat map, depth x length).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from dsv3.eval.multiple_choice import encode_pair
from dsv3.eval.perplexity import Span, score_spans

__all__ = ["NeedleTrial", "build_context", "run_needle", "plot_heatmap", "save_needle", "DEFAULT_LENGTHS", "DEFAULT_DEPTHS"]

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE = " The special magic number is {}. "
QUESTION = "\n\nQuestion: What is the special magic number mentioned in the text above?\n" \
           "Answer: The special magic number is"
ANSWER = " {}."


@dataclass
class NeedleTrial:
    length: int  # requested context length in tokens
    depth: float
    number: str
    tokens: int  # actual tokens of context + answer
    found: bool
    logprob: float


def _insert_at(haystack: str, depth: float, needle: str) -> str:
    """Put `needle` at the last sentence end at or before `depth` of the way into `haystack`."""
    cut = int(round(depth * len(haystack)))
    if 0 < cut < len(haystack):
        ends = [haystack.rfind(mark, 0, cut) for mark in (". ", ".\n", "\n")]
        best = max(ends)
        cut = best + 1 if best >= 0 else 0
    return haystack[:cut].rstrip() + needle + haystack[cut:].lstrip()


def build_context(tokenizer: Any, filler_ids: Sequence[int], length: int, depth: float,
                  number: str) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) with at most `length` tokens in all (BOS included)."""
    fixed = len(tokenizer.encode(NEEDLE.format(number) + QUESTION + ANSWER.format(number),
                                 add_special_tokens=False)) + 1
    budget = length - fixed
    for _ in range(8):
        if budget < 1:
            raise ValueError(f"context length {length} is too short for the needle and question")
        haystack = tokenizer.decode(list(filler_ids[:budget]))
        context = _insert_at(haystack, depth, NEEDLE.format(number)) + QUESTION
        ctx, ans = encode_pair(tokenizer, context, ANSWER.format(number))
        over = len(ctx) + len(ans) - length
        if over <= 0:
            return ctx, ans
        budget -= over
    raise RuntimeError(f"could not fit the haystack into {length} tokens")


def run_needle(model: Any, tokenizer: Any, filler: Sequence[str], lengths: Sequence[int] = DEFAULT_LENGTHS,
               depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 4, batch_size: int = 4, seed: int = 0,
               max_len: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the grid; lengths above the model's window (max_seq_len, or `max_len`) are dropped."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {d}")
    window = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
    lengths = sorted({int(n) for n in lengths if n <= window})
    if not lengths:
        raise ValueError(f"no context length fits the model's window ({window} tokens)")
    text = "\n\n".join(t for t in filler if t.strip())
    if not text:
        raise ValueError("needle filler text is empty")
    filler_ids = tokenizer.encode(text, add_special_tokens=False)
    while len(filler_ids) < max(lengths):  # repeat a short filler until it covers the longest context
        filler_ids = filler_ids + tokenizer.encode("\n\n" + text, add_special_tokens=False)
    rng = random.Random(seed)
    trials_out: list[NeedleTrial] = []
    spans: list[Span] = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                number = str(rng.randint(1_000_000, 9_999_999))
                ctx, ans = build_context(tokenizer, filler_ids, length, depth, number)
                spans.append(Span(tuple(ctx + ans), len(ctx)))
                trials_out.append(NeedleTrial(length, float(depth), number, len(ctx) + len(ans), False, 0.0))
    scores = score_spans(model, spans, batch_size=batch_size, desc="needle", progress=progress)
    for trial, score in zip(trials_out, scores):
        trial.found, trial.logprob = score.greedy, score.logprob
    def cell(L: int, d: float, key: str) -> float:
        return sum(getattr(t, key) for t in trials_out if t.length == L and t.depth == d) / trials

    grid = [[cell(L, d, "found") for L in lengths] for d in depths]
    logprob = [[cell(L, d, "logprob") for L in lengths] for d in depths]
    return {"lengths": lengths, "depths": [float(d) for d in depths], "trials_per_cell": trials,
            "accuracy": grid, "mean_accuracy": sum(map(sum, grid)) / (len(grid) * len(lengths)),
            "answer_logprob": logprob, "trials": [asdict(t) for t in trials_out]}


def plot_heatmap(result: dict[str, Any], path: str | Path, title: str = "Needle in a haystack") -> Path:
    """Accuracy heat map (rows: depth, columns: context length) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grid = result["lengths"], result["depths"], result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_needle(result: dict[str, Any], folder: str | Path, title: str = "Needle in a haystack") -> tuple[Path, Path]:
    """Write needle.json and needle.png into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "needle.json"
    json_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return json_path, plot_heatmap(result, folder / "needle.png", title)
