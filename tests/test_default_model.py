"""The shipped default model: loads and answers on a CPU; its bits-per-byte is what its logits say."""

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3
from dsv3.eval.perplexity import evaluate_perplexity
from dsv3.tokenizer import load_tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. The kernel's memory manager keeps a list of free pages.")


def test_default_model_is_a_small_deepseek_v3():
    model = dsv3.load_model(dsv3.default_model_path(), dtype=torch.float32)
    args = model.args
    assert args.kv_lora_rank and args.n_routed_experts and args.n_shared_experts and len(model.mtp) == 1
    assert args.score_func == "sigmoid" and args.correction_bias
    size = sum(p.stat().st_size for p in dsv3.default_model_path().glob("*.safetensors"))
    assert size < 60e6


def test_generate_from_the_command_line():
    """The README's first command (greedy here): the built-in chat model loads and answers in words, and ends its
    turn (how fast is a benchmark's business, not a test's)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("pip install torch"))
    argv = shlex.split(setup.split("&& dsv3 ", 1)[1])
    assert argv[:2] == ["generate", "--chat"]
    out = subprocess.run([sys.executable, "-m", "dsv3.cli", *argv, "--max-new-tokens", "64", "--temperature", "0"],
                         capture_output=True, text=True, timeout=600, check=True)
    words = [w for w in out.stdout.split() if w.isalpha()]
    assert len(words) >= 5, out.stdout
    assert "[dsv3 generate: model " in out.stderr and "default-chat-model" in out.stderr, out.stderr
    assert "1 thread(s)" in out.stderr, out.stderr
    assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s, finish: stop\]", out.stderr), out.stderr


def test_bits_per_byte_equals_hand_computation():
    path = dsv3.default_model_path()
    model = dsv3.load_model(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    got = evaluate_perplexity(model, tokenizer, [TEXT], max_len=512, progress=False)
    ids = tokenizer.encode(TEXT)  # BOS + text: every text token predicted from what precedes it
    assert ids[0] == tokenizer.bos_id
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens)[0, :-1].float()
    nll = F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
    expected_bpb = nll / (math.log(2) * len(TEXT.encode("utf-8")))
    assert abs(got.bits_per_byte - expected_bpb) < 1e-4
    assert got.tokens == len(ids) - 1
