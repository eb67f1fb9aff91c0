"""End-to-end tests of `dsv3 generate` / `dsv3 chat` on a tiny random checkpoint, and of `dsv3.chat.ChatSession`.

The checkpoint is written by `transformers`' own DeepseekV3ForCausalLM (vocab 129280, tiny dims) with
the real DeepSeek-V3 tokenizer files copied in; the same `transformers` model, greedy, is the oracle
for every answer. The real entry point runs in a subprocess; the slower scenarios (batch files,
Ctrl-C, /system, /reset) call `dsv3.cli.main` in-process. Chat keeps the conversation as token ids:
its second turn must be served partly from the engine's prefix cache and answer exactly what a fresh
engine (no prefix cache) and `transformers` answer for the same rendered conversation.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
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


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


GREEDY = ["--temperature", "0", "--dtype", "float32", "--device", "cpu"]


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
    assert rec == {"index": 0, "prompt": prompt, "text": tok.decode(want), "prompt_tokens": len(ids),
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
        rc = main(["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "6",
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
    assert main(["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "3", *GREEDY]) == 0
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
    assert main(["generate", "--model", str(eos_path), "--prompt", "stop early", "--max-new-tokens", "8",
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
    rc = main(["generate", "--model", str(path), "--prompt", "interrupt me", "--max-new-tokens", "20",
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
        assert main(["generate", "--model", str(path), "--prompt", "sample me", "--max-new-tokens", "8",
                         "--temperature", "1.0", "--top-k", "50", "--seed", str(seed), "--dtype", "float32",
                         "--output", str(out)]) == 0
        texts.append(json.loads(out.read_text(encoding="utf-8"))["text"])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def _stats(stderr: str) -> list[tuple[int, int, int, str]]:
    """(answer tokens, prompt tokens, prompt tokens from the prefix cache, conversation) of each `--stats` line."""
    return [(int(n), int(p), int(c), s) for n, p, c, s in
            re.findall(r"\[(\d+) tokens, [\d.]+ tokens/s[^;]*; prompt (\d+) tokens, (\d+) from the prefix cache, "
                       r"conversation (\w+)\]", stderr)]


def _continued(tok, ids: list[int], messages: list[dict]) -> list[int]:
    """The next prompt of a conversation kept as token ids: `ids` (the last prompt and its answer) plus the
    encoding of the rest of the rendered conversation, which must start with their text."""
    full = tok.apply_chat_template(messages)
    seen = tok.decode(ids)
    assert full.startswith(seen)
    prompt = ids + tok.encode(full[len(seen):], add_special_tokens=False)
    assert tok.decode(prompt) == full  # the same rendered conversation
    return prompt


BS = 4  # cache block size in the chat tests: the short turns fill whole blocks
CHAT = ["--max-new-tokens", "6", "--stats", "--block-size", str(BS), *GREEDY]


def test_chat_subprocess_reuses_the_prefix_cache(ckpt) -> None:
    path, model, tok = ckpt
    n = 7
    proc = _run(["chat", "--model", str(path), "--max-new-tokens", str(n), "--stats", "--block-size", str(BS), *GREEDY],
                stdin="Hello there!\nAnd a second question?\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    u1, u2 = {"role": "user", "content": "Hello there!"}, {"role": "user", "content": "And a second question?"}
    p1 = tok.encode_chat([u1])
    a1, stop1 = hf_greedy(model, p1, n)
    p2 = _continued(tok, p1 + a1, [u1, {"role": "assistant", "content": tok.decode(a1)}, u2])
    a2, _ = hf_greedy(model, p2, n)
    assert proc.stdout == tok.decode(a1) + "\n" + tok.decode(a2) + "\n"
    (n1, len1, hit1, conv1), (n2, len2, hit2, conv2) = _stats(proc.stderr)
    assert (n1, len1, hit1, conv1) == (len(a1), len(p1), 0, "new")
    assert (n2, len2, conv2) == (len(a2), len(p2), "kept")
    computed = len(p1) + len(a1) - (0 if stop1 else 1)  # the last sampled token is fed only if EOS follows it
    assert hit2 % BS == 0 and BS * (len(p1) // BS) <= hit2 <= computed  # at least the first prompt's full blocks


def test_chat_session_reuses_the_prefix_cache_and_answers_like_a_fresh_engine(ckpt) -> None:
    from dsv3.chat import ChatSession
    from dsv3.engine import LLM, SamplingParams

    path, model, tok = ckpt
    greedy = SamplingParams(temperature=0, max_tokens=6)
    llm = LLM(path, device="cpu", dtype="float32", block_size=BS, num_blocks=128)
    session = ChatSession(llm, llm.tokenizer, system="Be brief.")
    pieces: list[str] = []
    first = session.turn("What is a latent cache?", greedy, pieces.append)
    assert "".join(pieces) == first.answer.text and first.cache == "new"
    for user in ("Why is it compressed?", "And the rope part?"):
        before = llm.prefix_cache_hit_tokens
        turn = session.turn(user, greedy, pieces.append)
        assert turn.cache == "kept"
        assert llm.prefix_cache_hit_tokens - before == turn.answer.num_cached_tokens >= BS * 2
        # the rendered conversation, answered by an engine without a prefix cache and by transformers
        system = {"role": "system", "content": "Be brief."}
        assert tok.decode(turn.prompt_ids) == tok.apply_chat_template([system, *session.messages[:-1]])
        fresh = LLM(path, device="cpu", dtype="float32", block_size=BS, num_blocks=128, enable_prefix_caching=False)
        out = fresh.generate([turn.prompt_ids], greedy, use_tqdm=False)[0]
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        assert turn.answer.token_ids == ids and fresh.prefix_cache_hit_tokens == 0
        assert turn.answer.token_ids == hf_greedy(model, turn.prompt_ids, 6)[0]


def test_chat_prompt_continues_the_conversation_ids(ckpt) -> None:
    """With an answer whose text encodes back to its ids, the kept conversation is exactly the template's
    encoding; a changed beginning (system prompt) re-encodes it."""
    from dsv3.chat import ChatSession

    _, _, tok = ckpt
    session = ChatSession(None, tok)
    u1, u2 = {"role": "user", "content": "Capital of France?"}, {"role": "user", "content": "And of Spain?"}
    assert session.prompt_for(u1["content"]) == (tok.encode_chat([u1]), "new")
    answer = "Paris is the capital of France."
    a_ids = tok.encode(answer, add_special_tokens=False)
    assert tok.decode(a_ids) == answer
    session.messages = [u1, {"role": "assistant", "content": answer}]
    session.ids = tok.encode_chat([u1]) + a_ids
    ids, cache = session.prompt_for(u2["content"])
    assert cache == "kept" and ids[:len(session.ids)] == session.ids
    assert ids == tok.encode_chat([*session.messages, u2])
    session.system = "Answer in one word."
    ids, cache = session.prompt_for(u2["content"])
    assert cache == "rebuilt" and ids == tok.encode_chat([{"role": "system", "content": "Answer in one word."},
                                                          *session.messages, u2])


def _chat_in_process(monkeypatch, capsys, path: Path, lines: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    rc = main(["chat", "--model", str(path), *CHAT])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_ctrl_c_stops_answer_not_program(ckpt, monkeypatch, capsys) -> None:
    from dsv3.engine import LLM

    path, model, tok = ckpt
    step = LLM.step
    calls = []

    def step_and_interrupt(self):
        outs = step(self)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first answer, after its 3rd token
        return outs

    monkeypatch.setattr(LLM, "step", step_and_interrupt)
    previous = signal.getsignal(signal.SIGINT)
    rc, out, err = _chat_in_process(monkeypatch, capsys, path, ["first question", "second question"])
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored after each answer
    assert rc == 0 and "(interrupted)" in err
    stats = _stats(err)
    assert len(stats) == 2 and stats[0][0] == 3 and stats[1][3] == "kept"
    u1, u2 = {"role": "user", "content": "first question"}, {"role": "user", "content": "second question"}
    p1 = tok.encode_chat([u1])
    a1, _ = hf_greedy(model, p1, 3)
    p2 = _continued(tok, p1 + a1, [u1, {"role": "assistant", "content": tok.decode(a1)}, u2])
    a2, _ = hf_greedy(model, p2, 6)
    assert out == tok.decode(a1) + "\n" + tok.decode(a2) + "\n"
    assert stats[1][1] == len(p2) and stats[1][2] > 0


def test_chat_system_and_reset(ckpt, monkeypatch, capsys) -> None:
    path, model, tok = ckpt
    rc, out, err = _chat_in_process(monkeypatch, capsys, path, ["/system Answer in French.", "Bonjour", "/reset",
                                                                "Bonjour", "/bogus", "/system", "Bonjour", "/exit",
                                                                "never"])
    assert rc == 0
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"}]
    p = tok.encode_chat(conv)
    a, _ = hf_greedy(model, p, 6)
    answers = out.splitlines()
    assert answers[0] == answers[1] == tok.decode(a)  # /reset: the same first turn again, same answer
    stats = _stats(err)
    assert [s[1:] for s in stats[:2]] == [(len(p), 0, "new"), (len(p), BS * ((len(p) - 1) // BS), "new")]
    assert "unknown command /bogus" in err and "system prompt cleared" in err
    # clearing the system prompt changes the conversation's start: it is encoded afresh
    assert stats[2][3] == "rebuilt"
    full3 = tok.encode_chat([conv[1], {"role": "assistant", "content": tok.decode(a)}, conv[1]])
    assert stats[2][1] == len(full3)
    assert answers[2] == tok.decode(hf_greedy(model, full3, 6)[0])


def test_chat_turn_beyond_the_context_is_refused(ckpt, monkeypatch, capsys) -> None:
    path, _, tok = ckpt
    long = "word " * 40
    n = len(tok.encode_chat([{"role": "user", "content": long}]))
    assert n > 32
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\nshort\n"))
    capsys.readouterr()
    assert main(["chat", "--model", str(path), *CHAT, "--max-model-len", "32"]) == 0
    captured = capsys.readouterr()
    assert f"[the conversation needs {n} tokens but the context holds 32; /reset to start over]" in captured.err
    assert len(captured.out.splitlines()) == 1 and len(_stats(captured.err)) == 1  # only "short" was answered


def test_default_model_path(ckpt, monkeypatch, tmp_path: Path, capsys) -> None:
    import dsv3

    path, model, tok = ckpt
    monkeypatch.setattr(dsv3, "default_model_path", lambda: path, raising=False)
    out = tmp_path / "d.jsonl"
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--output", str(out), *GREEDY]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["prompt_tokens"] == len(tok.encode("hi"))
    monkeypatch.setattr(dsv3, "default_model_path", lambda: tmp_path / "absent", raising=False)
    capsys.readouterr()
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and "--model" in err and err.count("\n") == 1

    def not_installed():
        raise FileNotFoundError("the built-in default model is not installed at /x")

    monkeypatch.setattr(dsv3, "default_model_path", not_installed, raising=False)
    monkeypatch.setattr(dsv3, "default_chat_model_path", not_installed, raising=False)
    assert main(["chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed at /x" in err[0]


def test_bad_inputs_one_line_errors(ckpt, tmp_path: Path) -> None:
    path = str(ckpt[0])
    missing = str(tmp_path / "no_such_model")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": 3}\n', encoding="utf-8")
    bad_bytes = tmp_path / "latin1.txt"
    bad_bytes.write_bytes("first prompt\nsecond: caf\u00e9\n".encode("latin-1"))
    cases = {  # name: (argv, text in the error line, exit code)
        "missing folder": (["generate", "--model", missing, "--prompt", "x"], "no_such_model", 2),
        "chat missing folder": (["chat", "--model", missing], "no_such_model", 2),
        "prompt too long": (["generate", "--model", path, "--prompt", "word " * 300], f"context is {CONTEXT}", 2),
        "negative temperature": (["generate", "--model", path, "--prompt", "x", "--temperature", "-0.5"],
                                 "--temperature", 2),
        "unknown device": (["generate", "--model", path, "--prompt", "x", "--device", "tpu"], "--device", 2),
        "bad dtype": (["chat", "--model", path, "--dtype", "fp16"], "--dtype", 2),
        "no prompt": (["generate", "--model", path], "--prompt", 2),
        "not a number": (["generate", "--model", path, "--prompt", "x", "--max-new-tokens", "many"],
                         "--max-new-tokens", 2),
        "missing input file": (["generate", "--model", path, "--input-file", str(tmp_path / "nope.txt")], "nope.txt", 2),
        "bad prompt file": (["generate", "--model", path, "--input-file", str(bad_json)], "\"prompt\" field", 1),
        "fast on cpu": (["generate", "--model", path, "--prompt", "x", "--device", "cpu", "--fast"],
                        "--fast needs a CUDA device", 2),
        # bytes that are not UTF-8 reach Python as lone surrogates (os.fsencode turns them back into bytes)
        "non-UTF-8 prompt": (["generate", "--model", path, "--prompt", "caf\udce9"], "--prompt: not valid UTF-8", 2),
        "non-UTF-8 system": (["chat", "--model", path, "--system", "caf\udce9"], "--system: not valid UTF-8", 2),
        "non-UTF-8 prompt file": (["generate", "--model", path, "--input-file", str(bad_bytes)],
                                  f"{bad_bytes}:2: not valid UTF-8", 1),
        "system without chat": (["generate", "--model", path, "--prompt", "x", "--system", "Be brief."],
                                "--system needs --chat", 2),
        "resume without output": (["generate", "--model", path, "--prompt", "x", "--resume"],
                                  "--resume needs --input-file and --output", 2),
    }
    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsv3.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)

    # two at a time: each process imports torch, and 18 at once on a busy 2-core box outran any sane timeout
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(run, [argv for argv, _, _ in cases.values()])))
    for name, proc in procs.items():
        out, err = proc.stdout, proc.stderr
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == cases[name][2], f"{name}: {proc.returncode} {err}"
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert lines[0].startswith("dsv3 ") and cases[name][1] in lines[0], f"{name}: {lines[0]}"
        assert out == "", name


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_batch_writes_each_answer_as_it_finishes_and_resumes(ckpt, monkeypatch, tmp_path: Path, capsys):
    """Each answer reaches the output file while the batch still runs; Ctrl-C keeps the finished ones (exit
    130), and `--resume` generates only the rest, giving the file an uninterrupted run would have written."""
    from dsv3.engine import LLM

    path, model, tok = ckpt
    prompts = ["first of three", "second of three", "third of three"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "5",
            "--max-num-seqs", "1", "--output", str(out), *GREEDY]  # one sequence at a time: they finish in turn
    step = LLM.step

    def step_until_one_is_written(self):
        if out.is_file() and out.read_text(encoding="utf-8").count("\n") == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once the first answer is on disk, mid-batch
        return step(self)

    monkeypatch.setattr(LLM, "step", step_until_one_is_written)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 3 answers written" in err and "--resume" in err
    assert [r["index"] for r in _lines(out)] == [0]
    with out.open("a", encoding="utf-8") as f:
        f.write('{"index": 1, "prompt": "second of th')  # a line cut short by a hard kill is dropped
    monkeypatch.setattr(LLM, "step", step)
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 prompts already answered" in err and "1 unfinished line(s) dropped" in err
    assert re.search(r"\[2 requests, \d+ prompt tokens, \d+ output tokens, [\d.]+ s, time to first token "
                     r"[\d.]+ s \(mean\), decode [\d.]+ tokens/s\]", err), err
    recs = _lines(out)
    assert [(r["index"], r["prompt"]) for r in recs] == list(enumerate(prompts))
    for prompt, rec in zip(prompts, recs):
        want, _ = hf_greedy(model, tok.encode(prompt), 5)
        assert rec["text"] == tok.decode(want) and rec["completion_tokens"] == len(want)
    # everything answered: --resume has nothing left to do and keeps the file as it is
    before = out.read_text(encoding="utf-8")
    assert main([*argv, "--resume"]) == 0
    assert out.read_text(encoding="utf-8") == before
    # an output file written for other prompts is not taken for this file's answers
    src.write_text("\n".join(["changed first prompt", *prompts[1:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out}:1 answers prompt 1 with a different prompt" in err and err.count("\n") == 1
    assert out.read_text(encoding="utf-8") == before


def test_generate_one_prompt_file_is_still_jsonl(ckpt, tmp_path: Path, capsys) -> None:
    path, model, tok = ckpt
    src = tmp_path / "one.txt"
    src.write_text("only one prompt\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--input-file", str(src), "--max-new-tokens", "4", *GREEDY]) == 0
    lines = capsys.readouterr().out.splitlines()
    want, _ = hf_greedy(model, tok.encode("only one prompt"), 4)
    assert len(lines) == 1 and json.loads(lines[0])["text"] == tok.decode(want)


def test_start_line_and_threads(ckpt, monkeypatch, capsys, tmp_path) -> None:
    """generate, chat, eval and serve say which model they loaded and how (the checkpoint's weight format and the
    one in memory); one thread by default for a small CPU model, `--threads N` otherwise."""
    path, _, _ = ckpt
    capsys.readouterr()
    assert main(["generate", "--help"]) == 0
    assert "--threads N" in capsys.readouterr().out  # whose help gives the default policy
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        capsys.readouterr()
        assert main(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2", *GREEDY]) == 0
        err = capsys.readouterr().err
        n = sum(p.numel() for p in ckpt[1].parameters())
        line = next(line for line in err.splitlines() if line.startswith("[dsv3 generate: model "))
        assert str(path) in line and f"{n / 1e6:,.1f}M parameters" in line
        assert "F32 checkpoint, float32 in memory" in line
        assert "device cpu" in line and "dtype float32" in line and "1 thread(s)" in line
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        assert main(["chat", "--model", str(path), "--max-new-tokens", "2", "--threads", "2", *GREEDY]) == 0
        err = capsys.readouterr().err
        assert re.search(rf"\[dsv3 chat: model {re.escape(str(path))} .*2 thread\(s\)\]", err), err
        assert torch.get_num_threads() == 2
        assert main(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2", "--weights", "fp8",
                     *GREEDY]) == 0
        assert "F32 checkpoint, fp8 in memory" in capsys.readouterr().err
        text = tmp_path / "t.txt"
        text.write_text("some held-out text for the perplexity task", encoding="utf-8")
        assert main(["eval", "--model", str(path), "--tasks", "ppl", "--text", str(text), "--threads", "1",
                     "--output", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
        assert re.search(r"\[dsv3 eval: model .*F32 checkpoint.* 1 thread\(s\)\]", capsys.readouterr().err)
        assert torch.get_num_threads() == 1
        pytest.importorskip("fastapi")
        from dsv3.cli import build_parser
        from dsv3.cli.serve import build
        app, _ = build(build_parser(["serve"]).parse_args(["serve", "--model", str(path), "--device", "cpu",
                                                           "--threads", "2", "--dtype", "float32"]))
        assert app is not None and torch.get_num_threads() == 2
        assert re.search(r"\[dsv3 serve: model .* 2 thread\(s\)\]", capsys.readouterr().err)
    finally:
        torch.set_num_threads(before)


def test_chat_skips_a_line_that_is_not_utf8(ckpt, monkeypatch, capsys) -> None:
    path, _, _ = ckpt
    stdin = io.TextIOWrapper(io.BytesIO("caf\u00e9\nhello\n".encode("latin-1")), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    capsys.readouterr()
    assert main(["chat", "--model", str(path), "--max-new-tokens", "2", *GREEDY]) == 0
    captured = capsys.readouterr()
    assert "[input line 1 is not valid UTF-8 text; not sent]" in captured.err
    assert len(captured.out.splitlines()) == 1  # "hello" was answered
