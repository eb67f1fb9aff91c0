"""End-to-end tests of `dsv3 generate` / `dsv3 chat` on a tiny random checkpoint.

The checkpoint is written by `transformers`' own DeepseekV3ForCausalLM (vocab 129280, tiny dims) with
the real DeepSeek-V3 tokenizer files copied in; the same `transformers` model, greedy, is the oracle
for every answer. The real entry point runs in a subprocess; the slower scenarios (batch files,
Ctrl-C, /system, /reset) call the verb functions in-process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import chat as chat_cli
from dsv3 import generate as gen
from dsv3.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "data" / "deepseek-v3-tokenizer"
CONTEXT = 256
TINY = dict(vocab_size=129280, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=CONTEXT,
            num_nextn_predict_layers=0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def _ensure_tokenizer() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file() or not (TOKENIZER_DIR / "tokenizer_config.json").is_file():
        proc = subprocess.run(["bash", str(ROOT / ".ci" / "fetch_tokenizer.sh"), str(TOKENIZER_DIR)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"DeepSeek-V3 tokenizer missing in {TOKENIZER_DIR} and fetching it failed; "
                        f"run .ci/fetch_tokenizer.sh with network access. stderr: {proc.stderr[-500:]}")
    return TOKENIZER_DIR


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, transformers model, tokenizer) of a tiny random DeepSeek-V3 checkpoint."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    _ensure_tokenizer()
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    path = _save(model, tmp_path_factory.mktemp("tiny_v3"))
    return path, model, load_tokenizer(path)


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], bool]:
    """transformers' greedy continuation of `ids` (EOS not included) and whether EOS stopped it."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=1,
                             pad_token_id=1)[0, len(ids):].tolist()
    if 1 in out:
        return out[:out.index(1)], True
    return out, False


def _entry() -> list[str]:
    """The real `dsv3` entry point once dsv3/cli.py registers these verbs, else this module's main."""
    from dsv3 import cli
    if "dsv3.generate" in getattr(cli, "VERB_MODULES", ()):
        return [sys.executable, "-m", "dsv3.cli"]
    return [sys.executable, "-m", "dsv3.generate"]


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_entry() + args, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dsv3")
    gen.add_parser(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(argv)


GREEDY = ["--temperature", "0", "--dtype", "fp32"]


def test_generate_subprocess_matches_transformers(ckpt, tmp_path: Path) -> None:
    path, model, tok = ckpt
    prompt = "DeepSeek-V3 says: 你好, мир 😀"
    out = tmp_path / "out.jsonl"
    proc = _run(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12",
                 "--output", str(out), *GREEDY])
    assert proc.returncode == 0, proc.stderr
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id
    want, stopped = hf_greedy(model, ids, 12)
    assert proc.stdout == tok.decode(want) + "\n"  # streamed text
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec == {"prompt": prompt, "text": tok.decode(want), "prompt_tokens": len(ids),
                   "completion_tokens": len(want), "finish_reason": "stop" if stopped else "length"}
    assert re.search(r"tokens/s", proc.stderr)


def test_generate_batch_file_and_chat_format(ckpt, tmp_path: Path, capsys) -> None:
    path, model, tok = ckpt
    prompts = ["plain line prompt", "a JSON prompt\nwith two lines ✓", "third: 東京"]
    src = tmp_path / "in.txt"
    src.write_text(f"{prompts[0]}\n\n{json.dumps({'prompt': prompts[1]})}\n{prompts[2]}\n", encoding="utf-8")
    for chat in (False, True):
        out = tmp_path / f"out{chat}.jsonl"
        flags = ["--chat", "--system", "Be brief."] if chat else []
        rc = gen.main(["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "6",
                       "--output", str(out), *flags, *GREEDY])
        assert rc == 0
        recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["prompt"] for r in recs] == prompts
        for prompt, rec in zip(prompts, recs):
            if chat:
                ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}])
            else:
                ids = tok.encode(prompt)
            want, stopped = hf_greedy(model, ids, 6)
            assert rec["text"] == tok.decode(want) and rec["prompt_tokens"] == len(ids)
            assert rec["completion_tokens"] == len(want)
            assert rec["finish_reason"] == ("stop" if stopped else "length")
    # without --output the records go to stdout as JSON lines
    capsys.readouterr()
    assert gen.main(["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "3", *GREEDY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == prompts


def test_generate_stops_at_eos(ckpt, tmp_path: Path) -> None:
    path, model, tok = ckpt
    ids = tok.encode("stop early")
    free, _ = hf_greedy(model, ids, 8)
    # make EOS outscore the 4th greedy token wherever that token would win
    eos_model = type(model)(model.config).float().eval()
    eos_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        eos_model.lm_head.weight[1] = 1.5 * eos_model.lm_head.weight[free[3]]
    want, stopped = hf_greedy(eos_model, ids, 8)
    assert stopped and len(want) < 8  # the oracle itself stops on EOS
    eos_path = _save(eos_model, tmp_path / "eos")
    out = tmp_path / "o.jsonl"
    assert gen.main(["generate", "--model", str(eos_path), "--prompt", "stop early", "--max-new-tokens", "8",
                     "--output", str(out), *GREEDY]) == 0
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec["finish_reason"] == "stop" and rec["text"] == tok.decode(want)
    assert rec["completion_tokens"] == len(want)


def test_generate_ctrl_c_keeps_partial_answer(ckpt, monkeypatch, tmp_path: Path) -> None:
    from dsv3.engine import LLM

    path, model, tok = ckpt
    step = LLM.step
    calls = []

    def step_and_interrupt(self):
        outs = step(self)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the answer streams
        return outs

    monkeypatch.setattr(LLM, "step", step_and_interrupt)
    out = tmp_path / "i.jsonl"
    rc = gen.main(["generate", "--model", str(path), "--prompt", "interrupt me", "--max-new-tokens", "20",
                   "--output", str(out), *GREEDY])
    assert rc == 130
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec["finish_reason"] == "interrupted" and 0 < rec["completion_tokens"] < 20
    want, _ = hf_greedy(model, tok.encode("interrupt me"), rec["completion_tokens"])
    assert rec["text"] == tok.decode(want)


def test_generate_seed_reproducible(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    texts = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"s{i}.jsonl"
        assert gen.main(["generate", "--model", str(path), "--prompt", "sample me", "--max-new-tokens", "8",
                         "--temperature", "1.0", "--top-k", "50", "--seed", str(seed), "--dtype", "fp32",
                         "--output", str(out)]) == 0
        texts.append(json.loads(out.read_text(encoding="utf-8"))["text"])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def _stats(stderr: str) -> list[tuple[int, int, str]]:
    """(answer tokens, prefilled tokens, cache status) of each `--stats` line."""
    return [(int(n), int(p), c) for n, p, c in
            re.findall(r"\[(\d+) tokens, [\d.]+ tokens/s[^;]*; prefilled (\d+) tokens, cache (\w+)", stderr)]


def test_chat_subprocess_keeps_cache(ckpt) -> None:
    path, model, tok = ckpt
    n = 7
    proc = _run(["chat", "--model", str(path), "--max-new-tokens", str(n), "--stats", *GREEDY],
                stdin="Hello there!\nAnd a second question?\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    u1, u2 = "Hello there!", "And a second question?"
    p1 = tok.encode_chat([{"role": "user", "content": u1}])
    a1, stop1 = hf_greedy(model, p1, n)
    cached = p1 + (a1 if stop1 else a1[:-1])  # the last sampled token is fed only if something follows it
    full2 = tok.apply_chat_template([{"role": "user", "content": u1}, {"role": "assistant", "content": tok.decode(a1)},
                                     {"role": "user", "content": u2}])
    prefix = tok.decode(cached)
    assert full2.startswith(prefix)
    new2 = tok.encode(full2[len(prefix):], add_special_tokens=False)
    a2, _ = hf_greedy(model, cached + new2, n)  # full recompute over the same tokens
    assert proc.stdout == tok.decode(a1) + "\n" + tok.decode(a2) + "\n"
    stats = _stats(proc.stderr)
    assert stats == [(len(a1), len(p1), "new"), (len(a2), len(new2), "kept")]
    # the second turn fed only its own tokens, far fewer than re-prefilling the whole history
    assert len(new2) < len(tok.encode(full2, add_special_tokens=False)) - len(p1)


def _chat_in_process(path: Path, lines: list[str], extra: list[str] = ()) -> tuple[int, str, str]:
    args = _parse(["chat", "--model", str(path), "--max-new-tokens", "6", "--stats", *GREEDY, *extra])
    stdin, stdout, stderr = io.StringIO("".join(line + "\n" for line in lines)), io.StringIO(), io.StringIO()
    rc = chat_cli._chat(args, stdin, stdout, stderr)
    return rc, stdout.getvalue(), stderr.getvalue()


def test_chat_ctrl_c_stops_answer_not_program(ckpt, monkeypatch) -> None:
    path, model, tok = ckpt
    feed = chat_cli.Session.feed
    decode_steps = []

    def feed_and_interrupt(self, ids):
        logits = feed(self, ids)
        if len(ids) == 1:
            decode_steps.append(1)
            if len(decode_steps) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first answer
        return logits

    monkeypatch.setattr(chat_cli.Session, "feed", feed_and_interrupt)
    previous = signal.getsignal(signal.SIGINT)
    rc, out, err = _chat_in_process(path, ["first question", "second question"])
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored after each answer
    assert rc == 0
    assert "(interrupted)" in err
    stats = _stats(err)
    assert len(stats) == 2 and stats[0][0] == 3 and stats[1][2] == "kept"
    p1 = tok.encode_chat([{"role": "user", "content": "first question"}])
    a1, _ = hf_greedy(model, p1, 3)
    full2 = tok.apply_chat_template([{"role": "user", "content": "first question"},
                                     {"role": "assistant", "content": tok.decode(a1)},
                                     {"role": "user", "content": "second question"}])
    cached = p1 + a1  # all three tokens were fed before the stop was seen
    new2 = tok.encode(full2[len(tok.decode(cached)):], add_special_tokens=False)
    a2, _ = hf_greedy(model, cached + new2, 6)
    assert out == tok.decode(a1) + "\n" + tok.decode(a2) + "\n"


def test_chat_system_and_reset(ckpt) -> None:
    path, model, tok = ckpt
    rc, out, err = _chat_in_process(path, ["/system Answer in French.", "Bonjour", "/reset", "Bonjour", "/bogus",
                                           "/system", "Bonjour", "/exit", "never"])
    assert rc == 0
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"}]
    p = tok.encode_chat(conv)
    a, _ = hf_greedy(model, p, 6)
    answers = out.splitlines()
    assert answers[0] == answers[1] == tok.decode(a)  # /reset: the same first turn again, same answer
    stats = _stats(err)
    assert [s[1:] for s in stats[:2]] == [(len(p), "new"), (len(p), "new")]
    assert "unknown command /bogus" in err and "system prompt cleared" in err
    # clearing the system prompt changes the conversation's start: the cache is rebuilt
    assert stats[2][2] == "rebuilt"
    full3 = tok.encode_chat([conv[1], {"role": "assistant", "content": tok.decode(a)}, conv[1]])
    assert stats[2][1] == len(full3)


def test_default_model_path(ckpt, monkeypatch, tmp_path: Path, capsys) -> None:
    import dsv3

    path, model, tok = ckpt
    monkeypatch.setattr(dsv3, "default_model_path", lambda: path, raising=False)
    out = tmp_path / "d.jsonl"
    assert gen.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--output", str(out), *GREEDY]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["prompt_tokens"] == len(tok.encode("hi"))
    monkeypatch.setattr(dsv3, "default_model_path", lambda: tmp_path / "absent", raising=False)
    capsys.readouterr()
    assert gen.main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and "--model" in err

    def not_installed():
        raise FileNotFoundError("the built-in default model is not installed at /x")

    monkeypatch.setattr(dsv3, "default_model_path", not_installed, raising=False)
    assert gen.main(["chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed at /x" in err[0]


def test_bad_inputs_one_line_errors(ckpt, tmp_path: Path) -> None:
    path = str(ckpt[0])
    missing = str(tmp_path / "no_such_model")
    cases = {
        "missing folder": (["generate", "--model", missing, "--prompt", "x"], "no_such_model"),
        "chat missing folder": (["chat", "--model", missing], "no_such_model"),
        "prompt too long": (["generate", "--model", path, "--prompt", "word " * 300], f"context is {CONTEXT}"),
        "negative temperature": (["generate", "--model", path, "--prompt", "x", "--temperature", "-0.5"],
                                 "--temperature"),
        "unknown device": (["generate", "--model", path, "--prompt", "x", "--device", "tpu"], "--device"),
        "bad dtype": (["chat", "--model", path, "--dtype", "fp16"], "--dtype"),
        "no prompt": (["generate", "--model", path], "--prompt"),
        "not a number": (["generate", "--model", path, "--prompt", "x", "--max-new-tokens", "many"],
                         "--max-new-tokens"),
        "missing input file": (["generate", "--model", path, "--input-file", str(tmp_path / "nope.txt")], "nope.txt"),
    }
    procs = {name: subprocess.Popen(_entry() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=ROOT) for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode != 0, name
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert cases[name][1] in lines[0], f"{name}: {lines[0]}"
        assert out == "", name


def test_help_documents_every_flag() -> None:
    parser = argparse.ArgumentParser(prog="dsv3")
    sub = parser.add_subparsers(dest="verb")
    gen.add_parser(sub)
    for verb in ("generate", "chat"):
        p = sub.choices[verb]
        assert p.get_default("func") is (gen.generate_main if verb == "generate" else chat_cli.chat_main)
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and "default" in action.help, f"{verb} {action.option_strings}"
    flags = {a for action in sub.choices["generate"]._actions for a in action.option_strings}
    assert {"--model", "--prompt", "--input-file", "--chat", "--max-new-tokens", "--temperature", "--top-p",
            "--top-k", "--seed", "--device", "--dtype", "--output"} <= flags


def test_session_cache_equals_full_forward(ckpt) -> None:
    """Feeding a sequence in pieces through the cache gives the same next-token logits as one pass."""
    import dsv3

    path, model, tok = ckpt
    ours = dsv3.load_model(path, device="cpu", dtype=torch.float32)
    session = chat_cli.Session(ours, 64)
    ids = tok.encode("one two three four five six")
    session.feed(ids[:3])
    session.feed(ids[3:5])
    step = session.feed(ids[5:])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache holds 64"):
        session.feed([5] * 64)
