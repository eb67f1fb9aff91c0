"""Token shards on disk and the packed, resumable loader that reads them.

`dsv3 data tokenize --tokenizer DIR --input FILES --output DIR --val-fraction F` encodes every
document as `BOS text EOS` (so document boundaries stay visible) and appends it to the shards of
its split: `train_000.bin, ...` and `val_000.bin, ...`, raw little-endian uint16 when the
vocabulary fits (else uint32), readable with `np.memmap`. `meta.json` records the dtype, the
vocabulary size, BOS/EOS ids, the tokenizer's sha256, and per split the documents, UTF-8 bytes
(for bits-per-byte) and tokens of each shard. The split uses `corpus.is_validation`, the same
hash as `dsv3 data prepare`, so the corpus's val.jsonl documents land in val again.

`PackedLoader` treats a split as one token stream cut into non-overlapping windows of
`seq_len + 1` tokens; each epoch visits the windows in a permutation fixed by (seed, epoch).
Step s of an epoch takes the global batch `order[s*B*W : (s+1)*B*W]`, rank r its r-th slice
of B windows: ranks never overlap, and W ranks of batch B see exactly what one rank of batch
B*W sees. `state_dict()` is (epoch, step) plus the settings it depends on.

The command-line front ends are `dsv3/cli/data.py` (`dsv3 data prepare | tokenize`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from dsv3.train import corpus
from dsv3.train.bpe import BOS, EOS, iter_texts

SPLITS = ("train", "val")


def _special_ids(tokenizer_dir: Path, tok: Tokenizer) -> tuple[int, int]:
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids = []
    for key, default in (("bos_token", BOS), ("eos_token", EOS)):
        name = config.get(key) or default
        name = name["content"] if isinstance(name, dict) else name
        token_id = tok.token_to_id(name)
        if token_id is None:
            raise ValueError(f"tokenizer {tokenizer_dir} has no {key} {name!r}")
        ids.append(token_id)
    return ids[0], ids[1]


class _ShardWriter:
    """Appends token ids to `<split>_NNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.limit:
                self.close()
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self._file = open(self.folder / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            room = self.limit - self.shards[-1]["tokens"]
            self._file.write(ids[:room].astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += min(room, len(ids))
            ids = ids[room:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def tokenize_corpus(
    tokenizer_dir: Path,
    inputs: list[str | Path],
    output: Path,
    val_fraction: float = 0.0,
    batch_docs: int = 256,
    shard_tokens: int = 1 << 28,
) -> dict:
    """Encode all documents of `inputs` into train/val token shards in `output`; returns meta."""
    tokenizer_dir, output = Path(tokenizer_dir), Path(output)
    tok_file = tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    corpus.is_validation("", val_fraction)  # validates the fraction
    if batch_docs < 1 or shard_tokens < 1:
        raise ValueError(f"batch_docs and shard_tokens must be >= 1, got {batch_docs}, {shard_tokens}")
    tok = Tokenizer.from_file(str(tok_file))
    bos_id, eos_id = _special_ids(tokenizer_dir, tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    output.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for stale in output.glob(f"{split}_*.bin"):
            stale.unlink()
    start = time.time()
    writers = {s: _ShardWriter(output, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s: {"documents": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    texts = (t for t in iter_texts(inputs) if t.strip())  # a blank document would be BOS EOS alone
    with tqdm(desc="tokenizing", unit="doc") as bar:
        while batch := list(islice(texts, batch_docs)):
            encodings = tok.encode_batch(batch, add_special_tokens=False)
            for text, enc in zip(batch, encodings):
                split = "val" if corpus.is_validation(text, val_fraction) else "train"
                ids = np.empty(len(enc.ids) + 2, dtype=np.int64)
                ids[0], ids[1:-1], ids[-1] = bos_id, enc.ids, eos_id
                writers[split].write(ids)
                stats[split]["documents"] += 1
                stats[split]["bytes"] += len(text.encode("utf-8"))
                stats[split]["tokens"] += len(ids)
            bar.update(len(batch))
    for split in SPLITS:
        writers[split].close()
        stats[split]["shards"] = writers[split].shards
    if not stats["train"]["tokens"]:
        for split in SPLITS:
            for shard in writers[split].shards:
                (output / shard["file"]).unlink(missing_ok=True)
        found = "no documents" if not stats["val"]["documents"] else "documents only for validation"
        raise ValueError(f"{found} in {', '.join(str(p) for p in inputs)}: nothing to train on (a .jsonl needs a "
                         "'text' field per line, a .txt file text)")
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "document_format": "BOS text EOS",
        "tokenizer": ".",  # a copy of the tokenizer files sits beside the shards (paths resolve from here)
        "tokenizer_source": str(tokenizer_dir),
        "tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
        "val_fraction": val_fraction,
        "inputs": [str(p) for p in inputs],
        "splits": stats,
        "seconds": round(time.time() - start, 1),
    }
    for name in ("tokenizer.json", "tokenizer_config.json"):  # shards travel with their tokenizer
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, output / name)
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(data_dir: Path) -> dict:
    """The meta.json of a shard folder (FileNotFoundError naming the folder if absent; ValueError naming the file
    when it is not valid JSON or lacks what the loader reads)."""
    from dsv3.config import read_json
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no meta.json in {data_dir}: run `dsv3 data tokenize` first")
    meta = read_json(path)
    missing = [k for k in ("dtype", "vocab_size", "splits") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path}: not a shard index written by `dsv3 data tokenize` (no {', '.join(missing)})")
    return meta


class TokenStream:
    """The shards of one split as a single read-only sequence of token ids (memory-mapped)."""

    def __init__(self, data_dir: Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta = read_meta(data_dir)
        dtype = np.dtype(meta["dtype"])
        shards = [s for s in meta["splits"][split]["shards"] if s["tokens"] > 0]
        for s in shards:  # a missing, empty or cut-short shard, named (np.memmap would say "mmap length ...")
            path = Path(data_dir) / s["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {Path(data_dir) / 'meta.json'} is missing")
            if path.stat().st_size != s["tokens"] * dtype.itemsize:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, but meta.json lists {s['tokens']} "
                                 f"{dtype.name} tokens ({s['tokens'] * dtype.itemsize} bytes); the shard is "
                                 "damaged: run `dsv3 data tokenize` again")
        self.arrays = [np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r",
                                 shape=(s["tokens"],)) for s in shards]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        k, done = int(np.searchsorted(self.starts, start, side="right")) - 1, 0
        while done < length:
            offset = start + done - int(self.starts[k])
            piece = self.arrays[k][offset:offset + length - done]
            out[done:done + len(piece)] = piece
            done += len(piece)
            k += 1
        return out


class PackedLoader:
    """Batches of packed sequences: (input [B, T], target [B, T]) int64, target = input shifted
    by one token. Deterministic for a seed, resumable, sharded over ranks without overlap."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 loop: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.stream = TokenStream(Path(data_dir), split)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.loop = shuffle, loop
        self.num_windows = max(len(self.stream) - 1, 0) // seq_len
        self.steps_per_epoch = self.num_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{split} split of {data_dir} has {len(self.stream)} tokens: fewer than one global "
                f"batch of {batch_size * world_size} x {seq_len + 1}; lower batch_size or seq_len")
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step == self.steps_per_epoch:
            if not self.loop:
                raise StopIteration
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.batch_size * self.world_size + self.rank * self.batch_size
        windows = self._epoch_order()[first:first + self.batch_size]
        T = self.seq_len
        batch = np.stack([self.stream.read(int(w) * T, T + 1) for w in windows])  # [B, T+1]
        self.step += 1
        batch = torch.from_numpy(batch)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # [B, T], [B, T]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.world_size, "shuffle": self.shuffle,
                "split": self.split, "num_tokens": len(self.stream)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position; the settings that define the order must match (the
        global batch may be split over a different number of ranks)."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "shuffle", "split", "num_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader "
                                 f"{mine[key]!r}")
        if not 0 <= state["step"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state step {state['step']} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
