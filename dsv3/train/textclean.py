"""Text cleaning for the pre-training corpus: markup to plain prose, and duplicate keys.

`strip_rst` turns reStructuredText (Sphinx and kernel-doc flavoured) into plain text: a block pass
drops navigation, comments, tables and adornments and keeps prose, signatures and code; an inline
pass then resolves roles, links, literals and emphasis per paragraph. `strip_brown_tags` turns a
Brown-corpus file of `word/tag` tokens back into text, and `austen_chapters` unwraps one Jane Austen
novel (a vector of wrapped lines) into chapters. `normalize_for_dedup`, `content_hash` and `dedup`
define when two documents count as the same. Pure functions of their text; used by `corpus.py`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

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


def dedup(docs: Iterator[dict], seen: set[str] | None = None) -> Iterator[dict]:
    """Yield documents whose normalized text was not seen before (first occurrence wins)."""
    seen = set() if seen is None else seen
    for doc in docs:
        key = content_hash(doc["text"])
        if key not in seen:
            seen.add(key)
            yield doc


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
