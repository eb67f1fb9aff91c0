"""Tests of dsv3.train.corpus and the modules it reads with: markup stripping, Brown tags and
dedup (textclean), the split, the R serialization reader (rdata; on streams written here by hand
from the format), and `data prepare` end to end on stand-in sources (no network)."""

import gzip
import json
import random
import struct
import sys
import zlib

import numpy as np
import pytest

from dsv3.cli import main
from dsv3.train import corpus
from dsv3.train.corpus import Source, SourceError, is_validation
from dsv3.train.rdata import read_lazyload, read_r_serialized
from dsv3.train.textclean import austen_chapters, content_hash, dedup, strip_brown_tags, strip_rst

# ----------------------------------------------------------------------------- markup


def test_strip_rst_sphinx_page():
    page = "\n".join([
        ".. _intro-label:",
        "",
        "=====",
        "Intro",
        "=====",
        "",
        ".. toctree::",
        "   :maxdepth: 2",
        "",
        "   one",
        "   two",
        "",
        ".. This is a comment",
        "   spanning two lines.",
        "",
        "Use :func:`os.path.join` and :class:`~collections.abc.Mapping` with ``x = 1``,",
        "see :ref:`the guide <guide-label>` and `Python <https://python.org>`_ for *more*",
        "**bold** text and a :term:`role that",
        "wraps` lines.",
        "",
        ".. |sub| replace:: ``substituted``",
        "",
        "+-----+-----+",
        "| a   | b   |",
        "+=====+=====+",
        "| 1   | 2   |",
        "+-----+-----+",
        "",
        ".. function:: open(file, mode='r')",
        "              open(fd)",
        "   :noindex:",
        "",
        "   Open *file*.",
        "",
        "   .. note::",
        "",
        "      Mind the :data:`mode`.",
        "",
        "   .. versionadded:: 3.2",
        "",
        "Example::",
        "",
        "   x = a * b * c  # *not* emphasis, :func:`f` stays",
        "",
        ".. code-block:: python",
        "   :linenos:",
        "",
        "   print(``'hi'``)",
        "",
        ">>> 2 * 3",
        "6",
        "",
        "End.",
    ])
    expected = "\n".join([
        "Intro",
        "",
        "Use os.path.join and Mapping with x = 1,",
        "see the guide and Python for more",
        "bold text and a role that",
        "wraps lines.",
        "",
        "open(file, mode='r')",
        "open(fd)",
        "Open file.",
        "",
        "Note:",
        "Mind the mode.",
        "",
        "New in version 3.2.",
        "",
        "Example:",
        "",
        "   x = a * b * c  # *not* emphasis, :func:`f` stays",
        "",
        "print(``'hi'``)",
        "",
        ">>> 2 * 3",
        "6",
        "",
        "End.",
    ])
    assert strip_rst(page) == expected


def test_strip_rst_nested_indent_and_plain_text_untouched():
    plain = "A plain paragraph.\n\nAnother one, with 3 * 4 = 12 and a/b paths."
    assert strip_rst(plain) == plain
    nested = ".. warning::\n   Outer text.\n\n   .. code-block:: c\n\n      int x;\n\nAfter."
    assert strip_rst(nested) == "Warning:\nOuter text.\n\nint x;\n\nAfter."
    assert strip_rst(".. versionadded::\n\nText.") == "New in version.\n\nText."
    assert strip_rst(".. deprecated:: 3.4\n   Use y.") == "Deprecated since version 3.4.\nUse y."


def test_strip_brown_tags():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps wasn't/bedz* "
        "there/rb ./.\n``/`` Fine/jj ''/'' ./.\n\n\n\t(/( A/at 1/2/cd note/nn )/) ?/.\n"
    )
    assert strip_brown_tags(tagged) == (
        'The jury said "no evidence", it wasn\'t there. "Fine".\n\n(A 1/2 note)?'
    )


def test_austen_chapters_unwraps_paragraphs():
    lines = ["EMMA", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever.",
             "", "Second", "paragraph.", "", "", "CHAPTER II", "", "Next", None, "Last line."]
    chapters = list(austen_chapters(lines, "Emma"))
    assert chapters == [
        "Emma\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever.\n\nSecond paragraph.",
        "CHAPTER II\n\nNext\n\nLast line.",
    ]


# ----------------------------------------------------------------------------- dedup and split


def test_dedup_normalizes_case_and_whitespace_first_wins():
    docs = [{"text": "Hello  World\n", "source": "a"}, {"text": "hello world", "source": "b"},
            {"text": "hello, world", "source": "c"}, {"text": "HELLO\tWORLD", "source": "d"}]
    kept = list(dedup(iter(docs)))
    assert [d["source"] for d in kept] == ["a", "c"]
    assert content_hash("A  b") == content_hash("a b") != content_hash("ab")


def test_split_is_deterministic_order_free_and_proportional():
    rng = random.Random(0)
    texts = [" ".join(rng.choice("abcdefgh") * rng.randint(1, 5) for _ in range(20))
             + str(i) for i in range(4000)]
    first = [is_validation(t, 0.1) for t in texts]
    shuffled = texts[:]
    rng.shuffle(shuffled)
    by_text = {t: is_validation(t, 0.1) for t in shuffled}
    assert first == [by_text[t] for t in texts]
    frac = sum(first) / len(first)
    assert 0.085 < frac < 0.115  # binomial sd ~0.005
    # nested: a document in the 5% split is in the 10% split too
    assert all(is_validation(t, 0.1) for t in texts if is_validation(t, 0.05))
    assert not any(is_validation(t, 0.0) for t in texts)
    with pytest.raises(ValueError, match="val_fraction"):
        is_validation("x", 1.0)


# ----------------------------------------------------------------------------- R serialization
# Written from the format of R's serialize.c: XDR big-endian ints; an item starts with flags
# = type | has_attr<<9 | has_tag<<10 | levels<<12; references to earlier symbols are
# (index << 8) | 255.


def _i(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def _flags(sexp, attr=False, tag=False, levels=0):
    return _i(sexp | (attr << 9) | (tag << 10) | (levels << 12))


def _char(s):
    if s is None:
        return _flags(9) + _i(-1)
    raw = s.encode("utf-8")
    return _flags(9, levels=8 if not s.isascii() else 64) + _i(len(raw)) + raw


def _strs(values, attr=b""):
    return _flags(16, attr=bool(attr)) + _i(len(values)) + b"".join(map(_char, values)) + attr


class _Writer:
    """Tracks symbols so a repeated one is written as a reference."""

    def __init__(self):
        self.symbols = []

    def sym(self, name):
        if name in self.symbols:
            return _i(((self.symbols.index(name) + 1) << 8) | 255)
        self.symbols.append(name)
        return _flags(1) + _char(name)

    def names_attr(self, names):
        return _flags(2, tag=True) + self.sym("names") + _strs(names) + _flags(254)

    def named_list(self, items, names):
        return (_flags(19, attr=True) + _i(len(items)) + b"".join(items)
                + self.names_attr(names))


def _stream(body, version=3):
    head = b"X\n" + _i(version, 0x040200, 0x030500)
    return head + (_i(5) + b"UTF-8" if version == 3 else b"") + body


def test_r_reader_vectors_lists_refs_and_altrep():
    w = _Writer()
    ints = _flags(13) + _i(3) + _i(7, -1, 42)
    reals = _flags(14) + _i(2) + struct.pack(">dd", 1.5, -2.25)
    lgl = _flags(10) + _i(1) + _i(1)
    seq = (_flags(238) + _flags(2) + w.sym("compact_intseq") + _flags(2) + w.sym("base")
           + _flags(2) + _flags(13) + _i(1, 13) + _flags(254)
           + _flags(14) + _i(3) + struct.pack(">ddd", 4, 10, 2) + _flags(254))
    inner = w.named_list([_strs(["x"])], ["deep"])  # second "names": written as a reference
    body = w.named_list([_strs(["café", None, ""]), ints, reals, lgl, seq, inner],
                        ["s", "i", "r", "l", "seq", "inner"])
    obj = read_r_serialized(_stream(body))
    assert obj.type == 19
    assert obj.attributes["names"].value == ["s", "i", "r", "l", "seq", "inner"]
    s, i, r, lgl_, sq, inn = obj.value
    assert s.value == ["café", None, ""]
    np.testing.assert_array_equal(i.value, [7, -1, 42])
    np.testing.assert_array_equal(r.value, [1.5, -2.25])
    np.testing.assert_array_equal(lgl_.value, [1])
    assert sq.type == 13 and sq.value.tolist() == [10, 12, 14, 16]
    assert inn.attributes["names"].value == ["deep"] and inn.value[0].value == ["x"]
    assert read_r_serialized(_stream(_strs(["v2"]), version=2)).value == ["v2"]
    with pytest.raises(ValueError, match="XDR"):
        read_r_serialized(b"A\n" + _i(3))
    with pytest.raises(ValueError, match="truncated"):
        read_r_serialized(_stream(_strs(["abc"]))[:-2])


def test_read_lazyload_database(tmp_path):
    novels = {"emma": ["EMMA", "", "CHAPTER I", "Text é."], "persuasion": ["Persuasion", None]}
    rdb, where = b"", []
    for values in novels.values():
        raw = _stream(_strs(values))
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        where.append((len(rdb), len(chunk)))
        rdb += chunk
    w = _Writer()
    variables = w.named_list([_flags(13) + _i(2) + _i(*p) for p in where], list(novels))
    index = w.named_list([variables, _flags(19) + _i(0), _flags(10) + _i(1) + _i(1)],
                         ["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_stream(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    objects = read_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert {k: v.value for k, v in objects.items()} == novels


# ----------------------------------------------------------------------------- prepare


def _fake_sources(monkeypatch, fail=False):
    texts_a = [f"Document number {i} of source a. " * 10 for i in range(60)]
    texts_b = [f"Other text {i} from b, somewhat longer. " * 8 for i in range(40)]
    texts_b += [texts_a[3].upper(), "too short"]  # a cross-source duplicate and a short doc

    def reader(name, texts):
        def read(cache):
            if fail and name == "b":
                raise SourceError("Debian package b-pkg: `apt-get download b-pkg` failed: 404")
            return "1.0", iter({"text": t, "source": name, "id": str(k)}
                               for k, t in enumerate(texts))
        return read

    fake = {"a": Source("a", "debian:a-pkg", "MIT", reader("a", texts_a)),
            "b": Source("b", "npm:b-pkg", "PSF-2.0", reader("b", texts_b))}
    monkeypatch.setattr(corpus, "SOURCES", fake)
    return texts_a, texts_b


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_dedups_splits_and_writes_manifest(tmp_path, monkeypatch):
    texts_a, texts_b = _fake_sources(monkeypatch)
    m = corpus.prepare(tmp_path / "out", ["a", "b"], cache=tmp_path / "cache",
                       val_fraction=0.2, min_chars=50)
    train, val = _read_jsonl(tmp_path / "out" / "train.jsonl"), _read_jsonl(tmp_path / "out" / "val.jsonl")
    kept = texts_a + texts_b[:40]
    assert sorted(d["text"] for d in train + val) == sorted(kept)
    assert all(is_validation(d["text"], 0.2) for d in val)
    assert not any(is_validation(d["text"], 0.2) for d in train)
    assert 0 < len(val) < len(train)
    assert m["sources"]["b"]["dropped_duplicates"] == 1
    assert m["sources"]["b"]["dropped_short"] == 1
    assert m["sources"]["a"]["license"] == "MIT"
    for split, docs in (("train", train), ("val", val)):
        assert m[split]["documents"] == len(docs)
        assert m[split]["bytes"] == sum(len(d["text"].encode()) for d in docs)
        assert m["sources"]["a"]["documents"][split] == sum(d["source"] == "a" for d in docs)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def _cli(argv):
    return main(["data", *argv])


def test_cli_failed_source_is_one_line_and_skippable(tmp_path, monkeypatch, capsys):
    _fake_sources(monkeypatch, fail=True)
    out = tmp_path / "out"
    rc = _cli(["prepare", "--output", str(out), "--sources", "a", "b", "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 1 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("dsv3 data prepare: error: source 'b' failed:") and "b-pkg" in errors[0]
    rc = _cli(["prepare", "--output", str(out), "--sources", "a", "b", "--cache", str(tmp_path),
               "--skip-failed", "--min-chars", "10"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["a"] and "b-pkg" in manifest["failed"]["b"]
    with pytest.raises(ValueError, match="unknown source"):
        corpus.prepare(out, ["nope"], cache=tmp_path)


def test_missing_tool_names_the_package(tmp_path):
    with pytest.raises(SourceError, match="Debian package foo.*not installed"):
        corpus._run(["no-such-tool-dsv3"], tmp_path, "Debian package foo")
    script = "import sys; sys.stderr.write('W: noise\\nE: Unable to locate package foo\\ntail\\n'); sys.exit(100)"
    with pytest.raises(SourceError, match="Debian package foo: .* failed: E: Unable to locate package foo$"):
        corpus._run([sys.executable, "-c", script], tmp_path, "Debian package foo")
