"""Supervised fine-tuning: the chat data builders (on small reST sources with known answers), the assistant-token
mask (against tokenizing the rendered pieces one by one), LoRA adapters (a merged checkpoint computes what the
adapted model computed), and a short SFT run that lowers the answer loss."""

import json
import shutil

import pytest
import torch

import dsv3
from dsv3.checkpoint.adapter import materialize, merge_adapter, save_adapter
from dsv3.tokenizer import load_tokenizer
from dsv3.train.chat_data import chatterbot_pairs, conversations, python_api, python_faq, python_glossary
from dsv3.train.lora import add_lora, lora_factors, merge_lora
from dsv3.train.sft import SFTConfig, encode_conversation, sft, tensorize
from hf_models import make_v3

FAQ = """\
General
=======

How do I copy a file?
---------------------

The :mod:`shutil` module contains a :func:`~shutil.copyfile`
function.  Note that it does not copy metadata.

Is this a question
------------------

No, since the heading has no question mark at its end.
"""

GLOSSARY = """\
.. glossary::

   ``>>>``
      The default Python prompt of the interactive shell.

   lambda
      An anonymous inline function consisting of a single
      :term:`expression` which is evaluated when the function is called.

      A second paragraph about it.
"""

API = """\
:mod:`shutil` --- High-level file operations
============================================

.. module:: shutil
   :synopsis: High-level file operations, including copying.

**Source code:** :source:`Lib/shutil.py`

--------------

The :mod:`shutil` module offers a number of high-level operations on files and
collections of files.

.. function:: copyfile(src, dst, *, \\
                       follow_symlinks=True)

   Copy the contents of the file named *src* to a file named
   *dst* and return *dst*.

   .. versionchanged:: 3.3
      Added *follow_symlinks* argument.

.. class:: Archiver(name)

   An archive writer for the
   :class:`zipfile.ZipFile` format.

   .. method:: close()

      Close the archive and flush it.
"""


def test_faq_questions_and_answers():
    assert list(python_faq(FAQ)) == [
        ("How do I copy a file?",
         "The shutil module contains a copyfile function.  Note that it does not copy metadata.")]


def test_glossary_terms_and_definitions():
    pairs = list(python_glossary(GLOSSARY))
    assert len(pairs) == 1  # ">>>" is not a word term
    question, answer = pairs[0]
    assert question in ("What is lambda in Python?", "What does lambda mean in Python?")
    assert answer == ("An anonymous inline function consisting of a single expression which is evaluated when the "
                      "function is called.\n\nA second paragraph about it.")


def test_library_reference_entries():
    pairs = dict(python_api(API))
    assert pairs["What is the shutil module in Python?"] == (
        "The shutil module: High-level file operations, including copying. The shutil module offers a number of "
        "high-level operations on files and collections of files.")
    copy = next(q for q in pairs if "shutil.copyfile()" in q)
    assert pairs[copy] == "Copy the contents of the file named src to a file named dst and return dst."
    archiver = next(q for q in pairs if "shutil.Archiver" in q and "close" not in q)
    assert pairs[archiver] == "An archive writer for the zipfile.ZipFile format."
    close = next(q for q in pairs if "shutil.Archiver.close()" in q)  # a method named with its class
    assert pairs[close] == "Close the archive and flush it."
    assert len(pairs) == 4


def test_chatterbot_dialogues_and_conversations():
    pytest.importorskip("yaml")
    text = ("categories:\n- x\nconversations:\n- - Hello\n  - Hi there!\n  - Hey.\n- - only one\n"
            "- - What is AI?\n  - A field.\n")
    pairs = list(chatterbot_pairs(text))
    assert pairs == [("Hello", "Hi there!"), ("What is AI?", "A field.")]
    convs = conversations([("chatterbot", q, a) for q, a in pairs])
    for conv, (q, a) in zip(convs, pairs):
        roles = [m["role"] for m in conv["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"],
                         ["user", "assistant", "user", "assistant"],
                         ["system", "user", "assistant", "user", "assistant"])
        turns = [m for m in conv["messages"] if m["role"] != "system"]
        assert (turns[0]["content"], turns[1]["content"]) == (q, a)


def test_assistant_mask_equals_tokenizing_the_pieces():
    """The mask marks exactly the answers and their closing EOS: tokenizing the rendered text piece by piece
    (context, answer + EOS, context, answer + EOS) gives the same ids, and the answer pieces are the masked ones."""
    tok = load_tokenizer(dsv3.default_model_path())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"},
                {"role": "assistant", "content": "An immutable sequence."},
                {"role": "user", "content": "And a list?"}, {"role": "assistant", "content": "A mutable one."}]
    ids, mask = encode_conversation(tok, messages)
    eos = tok.eos_token
    pieces = [(f"{tok.bos_token}Be brief.<｜User｜>What is a tuple?<｜Assistant｜>", False),
              (f"An immutable sequence.{eos}", True), ("<｜User｜>And a list?<｜Assistant｜>", False),
              (f"A mutable one.{eos}", True)]
    want_ids, want_mask = [], []
    for text, answer in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        want_ids += piece
        want_mask += [answer] * len(piece)
    assert ids == want_ids and mask == want_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"An immutable sequence.{eos}A mutable one.{eos}"
    short_ids, short_mask = encode_conversation(tok, messages, max_len=5)
    assert short_ids == ids[:5] and short_mask == mask[:5]
    with pytest.raises(ValueError, match="assistant"):
        encode_conversation(tok, messages[:2])


def _tiny_chat_checkpoint(folder):
    """A tiny random DeepSeek-V3 (transformers' own) with the built-in model's tokenizer and chat template."""
    make_v3(folder, vocab_size=load_tokenizer(dsv3.default_model_path()).vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(dsv3.default_model_path() / name, folder / name)


def test_lora_merged_checkpoint_computes_what_the_adapted_model_computed(tmp_path):
    base = tmp_path / "base"
    _tiny_chat_checkpoint(base)
    model = dsv3.load_model(base, dtype=torch.float32, progress=False)
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
    targets = add_lora(model, rank=4, alpha=8)
    assert targets and not any(".experts.0." in t for t in targets) and any("shared_experts" in t for t in targets)
    assert all(p.requires_grad == ("parametrizations" in n and n.endswith((".A", ".B")))
               for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)  # B starts at zero
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        adapted = model(tokens)
    assert (adapted - before).abs().max() > 1e-3
    save_adapter(lora_factors(model, model.args.n_layers), tmp_path / "adapter", base, rank=4, dtype=torch.float32)
    merged = dsv3.load_model(merge_adapter(tmp_path / "adapter", tmp_path / "merged"), dtype=torch.float32,
                             progress=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
        merge_lora(model)
        torch.testing.assert_close(model(tokens), adapted, rtol=1e-5, atol=1e-5)
    cached = materialize(tmp_path / "adapter", tmp_path / "cache")
    assert materialize(tmp_path / "adapter", tmp_path / "cache") == cached  # built once, then reused
    assert (cached / "tokenizer.json").is_file() and (cached / "config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"] == "../base"


def test_short_sft_run_lowers_the_answer_loss(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path / "base"
        _tiny_chat_checkpoint(base)
        convs = [{"messages": [{"role": "user", "content": f"What is {w}?"},
                               {"role": "assistant", "content": f"{w.capitalize()} is a word of the test."}]}
                 for w in ("alpha", "beta", "gamma", "delta")]
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in convs))
        cfg = SFTConfig(epochs=6, batch_size=2, lr=1e-2, final_lr=1e-3, warmup_steps=1, lora_rank=4)
        summary = sft(base, data, tmp_path / "out", cfg, val_file=data, progress=False)
        assert summary["steps"] == 12 and summary["train_conversations"] == 4
        assert summary["val_ce_after"] < 0.8 * summary["val_ce_before"]
        metrics = [json.loads(line) for line in (tmp_path / "out" / "sft_metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 12 and "val_ce" in metrics[-1]
        assert len(tensorize(load_tokenizer(base), [c["messages"] for c in convs], 512)) == 4
        assert (tmp_path / "out" / "adapter.safetensors").is_file()
    finally:
        torch.set_num_threads(threads)


def test_sft_command_line_errors_are_one_line(tmp_path, capsys):
    from dsv3.cli import main

    base = str(dsv3.default_model_path())
    assert main(["sft", "--base", base, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no training conversations" in err and "dsv3 data chat" in err
    assert main(["sft", "--base", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    assert main(["sft", "--base", base, "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2:" in err
    assert main(["sft", "--base", base, "--data", str(bad), "--out", str(tmp_path / "o"), "--lora-rank", "0"]) == 2
    assert "--lora-rank" in capsys.readouterr().err
