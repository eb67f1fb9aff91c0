"""A reader of R's serialization format and of R lazy-load databases (`Rdata.rdx` + `Rdata.rdb`).

R packages ship their data sets as a lazy-load database: a gzip'd serialized index that maps each
object's name to an (offset, length) in the .rdb file, where each object is a zlib-compressed
serialization stream. `read_lazyload` reads all objects of one; `read_r_serialized` parses one
XDR stream (versions 2 and 3) into nested `RObject`s: enough for data (vectors, lists, pairlists,
symbols, references, ALTREP compact sequences and wrappers), not for code. The corpus uses it to
read Jane Austen's novels from the janeaustenr package without R installed.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
