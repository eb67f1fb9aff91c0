"""Chat (instruction-tuning) data from packages: question/answer conversations for supervised fine-tuning.

`dsv3 data chat --output DIR` writes

    DIR/train.jsonl, DIR/val.jsonl   one {"messages": [{"role", "content"}, ...], "source": ...} per line
    DIR/manifest.json                per source: package, version, license, conversations

Sources, all fetched by package name like the pre-training corpus (`corpus.py`):
- `python-faq`: the Python FAQ (Debian `python3.11-doc`, PSF): every section whose heading is a question,
  answered by the section's first paragraphs;
- `python-glossary`: the Python glossary, "What is <term> in Python?" answered by its definition;
- `python-api`: the library reference: "What does json.dumps() do?" answered by the first paragraph of
  the function's, class's or method's description, and "What is the json module?" by the module's
  synopsis and opening paragraph;
- `chatterbot`: the English dialogues of PyPI `chatterbot-corpus` (BSD-3-Clause): greetings, small talk
  and trivia, the first answer of each dialogue (its persona file, which names another bot, is left out).

The Python documentation is also in the base model's pre-training corpus, so tuning on it teaches the
model to answer in the chat format from what it has read. A conversation's question decides its split
(`corpus.is_validation`), and which phrasing, system prompt and two-turn pairing it gets is a hash of its
text, so the files are a pure function of the packages.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsv3.train.corpus import DEFAULT_CACHE, SourceError, fetch_debian, is_validation
from dsv3.train.textclean import strip_inline, strip_rst

CHATTERBOT = "chatterbot-corpus==1.3.3"
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You answer questions about Python and computers.")
_HEADING = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")  # a directive option line (`:synopsis: ...`), not a role
_SIG = re.compile(r"^(\s*)\.\.\s+(?:py:)?(function|class|method|exception|module|currentmodule|glossary)::\s*(.*)$")

Conversation = dict  # {"messages": [...], "source": str}


def _pick(text: str, options: tuple[str, ...]) -> str:
    """A deterministic choice among `options` by a hash of `text`."""
    return options[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(options)]


def _flow(lines: list[str]) -> str:
    """One paragraph of reStructuredText lines as one line of plain text."""
    text = re.sub(r"\\(?=\S)", "", " ".join(line.strip() for line in lines))  # reST escapes
    return re.sub(r"\s+", " ", strip_inline(text)).strip()


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs of `lines` (already de-indented), flowed."""
    out, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(_flow(cur))
            cur = []
    return out


def _body(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The block indented deeper than `indent` from `start`: (its lines, index after it)."""
    j, end = start, start
    while j < len(lines):
        if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) <= indent:
            break
        j += 1
        if lines[j - 1].strip():
            end = j
    return lines[start:end], end


def _prose(text: str) -> bool:
    """Whether a paragraph reads as an answer: a sentence of words, not markup or a code line."""
    return (len(text) >= 25 and text[0].isalnum() and not text.startswith(("..", ">>>"))
            and not text.endswith(":") and "::" not in text and text.count(" ") >= 3)


def _answer(paragraphs: list[str], limit: int = 500) -> str | None:
    """The first prose paragraph, and the next ones while the answer stays under `limit` characters."""
    kept: list[str] = []
    for p in paragraphs:
        if not _prose(p):
            if kept:
                break
            continue
        if kept and len(" ".join(kept)) + len(p) > limit:
            break
        kept.append(p)
    if not kept or len(kept[0]) > 2 * limit:
        return None
    return "\n\n".join(kept)


# ----------------------------------------------------------------------------- python docs

def _api_name(sig: str) -> str | None:
    """`dumps(obj, *, skipkeys=False, ...` -> `dumps`; None when the signature has no plain name."""
    m = re.match(r"([A-Za-z_][\w.]*)", sig.strip())
    return m.group(1) if m else None


def python_api(text: str) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs of one library-reference page: functions, classes, methods, module."""
    lines = text.expandtabs(8).splitlines()
    module, cls = None, None
    i = 0
    while i < len(lines):
        m = _SIG.match(lines[i])
        if not m:
            i += 1
            continue
        indent, kind, arg = len(m.group(1)), m.group(2), m.group(3).strip()
        body, end = _body(lines, i + 1, indent)
        i += 1  # nested directives (a class's methods) are read on the way through its body
        if kind in ("module", "currentmodule"):
            module = arg or module
            if kind == "module":
                synopsis = next((b.split(":synopsis:", 1)[1].strip() for b in body if ":synopsis:" in b), "")
                rest = [line for line in lines[end:end + 200] if not line.startswith("**Source code")]
                first = _answer(_paragraphs(_strip_directives(rest)), 400)
                if synopsis and first:
                    yield (f"What is the {module} module in Python?",
                           f"The {module} module: {strip_inline(synopsis).rstrip('.')}. {first}")
            continue
        if kind == "glossary":
            continue
        name = _api_name(arg)
        if not name or not module:
            continue
        sig_lines = 0
        while sig_lines < len(body) and body[sig_lines].strip() and not _OPTION.match(body[sig_lines]) \
                and arg.endswith("\\"):  # a signature continued over lines
            arg = body[sig_lines].strip()
            sig_lines += 1
        desc = [b for b in body[sig_lines:] if not _OPTION.match(b)]
        depth = min((len(b) - len(b.lstrip()) for b in desc if b.strip()), default=0)
        answer = _answer(_paragraphs(_strip_directives([b[depth:] for b in desc])), 400)
        if kind == "class" or kind == "exception":
            cls = name.split(".")[-1]
        if answer is None:
            continue
        if kind == "method" and "." not in name and cls:
            name = f"{cls}.{name}"
        full = name if name.startswith(module + ".") else f"{module}.{name}"
        if kind in ("function", "method"):
            q = _pick(full, (f"What does {full}() do?", f"What is {full}() used for?",
                             f"Explain {full}() in Python."))
        else:
            q = _pick(full, (f"What is {full} in Python?", f"What is the {full} class for?"))
        yield q, answer


def _strip_directives(lines: list[str]) -> list[str]:
    """Lines with every top-level directive block (and its body) removed: the prose paragraphs remain."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(".. ") or _HEADING.match(line) or _OPTION.match(line):
            indent = len(line) - len(line.lstrip())
            _, i = _body(lines, i + 1, indent)
            out.append("")
            continue
        out.append(line)
        i += 1
    return out


def python_glossary(text: str) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs of the glossary: each term and the first paragraphs of its definition."""
    lines = text.expandtabs(8).splitlines()
    start = next((k for k, line in enumerate(lines) if line.strip() == ".. glossary::"), None)
    if start is None:
        return
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if not line.strip() or len(line) - len(line.lstrip()) != 3:
            i += 1
            continue
        terms = [line.strip()]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) == 3:
            terms.append(lines[i].strip())
            i += 1
        body, i = _body(lines, i, 3)
        answer = _answer(_paragraphs(_strip_directives([b[6:] for b in body])), 450)
        term = strip_inline(terms[0])
        if answer and re.match(r"^[A-Za-z][\w -]*$", term):
            yield _pick(term, (f"What is {term} in Python?", f"What does {term} mean in Python?")), answer


def python_faq(text: str) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs of a FAQ page: headings that end with '?' and their sections' opening."""
    lines = text.expandtabs(8).splitlines()
    heads = [k for k in range(len(lines) - 1)
             if lines[k].strip() and _HEADING.match(lines[k + 1]) and not _HEADING.match(lines[k])
             and len(lines[k + 1].strip()) >= len(lines[k].strip())]
    for n, k in enumerate(heads):
        question = strip_inline(lines[k].strip())
        if not question.endswith("?"):
            continue
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        body = strip_rst("\n".join(lines[k + 2:end]))
        paras = [p for p in body.split("\n\n") if p.strip()]
        kept: list[str] = []
        for p in paras:
            if kept and len("\n\n".join(kept)) + len(p) > 700:
                break
            kept.append(p if p.startswith((" ", ">>>")) else re.sub(r"\s*\n\s*", " ", p))
        if kept and _prose(kept[0]) and len(kept[0]) <= 1400:
            yield question, "\n\n".join(kept)


def _python_docs(cache: Path) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    root, version = fetch_debian("python3.11-doc", cache)
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if not (sources / "glossary.rst.txt").exists():
        raise SourceError(f"python-docs: no glossary.rst.txt under {sources}")
    out: dict[str, list[tuple[str, str]]] = {"python-faq": [], "python-glossary": [], "python-api": []}
    for path in sorted((sources / "faq").glob("*.rst.txt")):
        out["python-faq"] += python_faq(path.read_text("utf-8", "replace"))
    out["python-glossary"] += python_glossary((sources / "glossary.rst.txt").read_text("utf-8", "replace"))
    for path in sorted((sources / "library").glob("*.rst.txt")):
        out["python-api"] += python_api(path.read_text("utf-8", "replace"))
    return version, out


# ----------------------------------------------------------------------------- chatterbot

def fetch_pypi(spec: str, cache: Path) -> Path:
    """Download a PyPI wheel (`pip download --no-deps`) into the cache and unzip it; returns the folder."""
    name, version = spec.split("==")
    folder = cache / "pypi"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    wheels = sorted(folder.glob(f"{stem}-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d",
                               str(folder)], capture_output=True, text=True)
        wheels = sorted(folder.glob(f"{stem}-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise SourceError(f"PyPI package {spec}: pip download failed: {reason}")
    root = folder / stem
    if not (root / ".extracted").exists():
        with zipfile.ZipFile(wheels[-1]) as whl:
            whl.extractall(root)
        (root / ".extracted").touch()
    return root


def chatterbot_pairs(yaml_text: str) -> Iterator[tuple[str, str]]:
    """The (first statement, first answer) of every dialogue of one chatterbot-corpus YAML file."""
    import yaml

    data = yaml.safe_load(yaml_text) or {}
    for conv in data.get("conversations") or []:
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
            q, a = conv[0].strip(), conv[1].strip()
            if q and a:
                yield q, a


def _chatterbot(cache: Path) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    try:
        import yaml  # noqa: F401
    except ImportError as exc:
        raise SourceError("chatterbot: needs PyYAML (pip install -e \".[train]\")") from exc
    root = fetch_pypi(CHATTERBOT, cache)
    files = sorted((root / "chatterbot_corpus" / "data" / "english").glob("*.yml"))
    if not files:
        raise SourceError(f"chatterbot: no english/*.yml in {root}")
    pairs = [p for f in files if f.stem != "botprofile" for p in chatterbot_pairs(f.read_text("utf-8"))]
    return CHATTERBOT.split("==")[1], {"chatterbot": pairs}


SOURCES = {
    "python-docs": ("debian:python3.11-doc", "PSF-2.0", _python_docs),
    "chatterbot": ("pypi:" + CHATTERBOT, "BSD-3-Clause", _chatterbot),
}


# ----------------------------------------------------------------------------- prepare

def conversations(pairs: list[tuple[str, str, str]]) -> list[Conversation]:
    """Conversations from (source, question, answer) triples: one turn each; one in ten also gets a system
    prompt, and one in five is followed by the next pair of the same source as a second turn."""
    out: list[Conversation] = []
    for k, (source, q, a) in enumerate(pairs):
        key = int(hashlib.sha256(f"{q}\0{a}".encode()).hexdigest(), 16)
        messages: list[dict[str, Any]] = []
        if key % 10 == 0:
            messages.append({"role": "system", "content": _pick(q, SYSTEM_PROMPTS)})
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if key % 5 == 1 and k + 1 < len(pairs) and pairs[k + 1][0] == source:
            messages += [{"role": "user", "content": pairs[k + 1][1]},
                         {"role": "assistant", "content": pairs[k + 1][2]}]
        out.append({"messages": messages, "source": source})
    return out


def prepare_chat(output: Path, cache: Path = DEFAULT_CACHE, val_fraction: float = 0.02) -> dict:
    """Fetch the sources, build the conversations, split them by their first question's hash, and write
    train.jsonl, val.jsonl and manifest.json into `output`. Returns the manifest."""
    output, cache = Path(output), Path(cache).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    manifest: dict[str, Any] = {"val_fraction": val_fraction, "sources": {}}
    triples: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for name, (package, license_, read) in SOURCES.items():
        version, groups = read(cache)
        for source, pairs in groups.items():
            kept = 0
            for q, a in pairs:
                if q.lower() in seen:  # one answer per question
                    continue
                seen.add(q.lower())
                triples.append((source, q, a))
                kept += 1
            manifest["sources"][source] = {"package": package, "version": version, "license": license_,
                                           "pairs": kept}
    convs = conversations(triples)
    counts = {"train": 0, "val": 0}
    with open(output / "train.jsonl", "w") as train, open(output / "val.jsonl", "w") as val:
        for conv in convs:
            first = next(m["content"] for m in conv["messages"] if m["role"] == "user")
            split = "val" if is_validation(first, val_fraction) else "train"
            (val if split == "val" else train).write(json.dumps(conv, ensure_ascii=False) + "\n")
            counts[split] += 1
    manifest.update({"train": counts["train"], "val": counts["val"], "seconds": round(time.time() - start, 1)})
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
