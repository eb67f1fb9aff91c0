"""Write a `Transformer` as an HF-format folder: `config.json`, safetensors shards, and the index.

Names follow `dsv3.checkpoint.names`; each MTP layer also gets copies of the shared embedding and head
(`embed_tokens`, `shared_head.head`) as in the official release. Files are written under temporary names
and renamed when complete, so an interrupted save leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.checkpoint.files import set_normal_mode
from dsv3.checkpoint.names import SHARED_COPIES, ours_to_hf
from dsv3.config import _dtype_name
from dsv3.model import Transformer

# what a checkpoint folder holds beside the weights for `load_tokenizer` (and `transformers`' AutoTokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_state_dict(model: Transformer, mtp_copies: bool = True) -> dict[str, torch.Tensor]:
    """HF name -> tensor (CPU, contiguous, no shared storage), with the MTP copies of embedding/head unless
    `mtp_copies=False` (our loader and `transformers` do not need them)."""
    args = model.args
    state = model.state_dict()
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        out[ours_to_hf(key, args.n_layers)] = tensor.detach().to("cpu").contiguous()
    for k in range(args.num_nextn_predict_layers if mtp_copies else 0):
        for copy_name, main_key in SHARED_COPIES.items():
            out[ours_to_hf(f"mtp.{k}.{copy_name}", args.n_layers)] = state[main_key].detach().to("cpu").clone()
    return out


def save_model(model: Transformer, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
               mtp_copies: bool = True, tokenizer: str | Path | bool | None = None) -> Path:
    """Save into `path` (created if needed). Returns the path. `mtp_copies=False` leaves out the copies of
    the embedding and head that the official layout repeats in each MTP layer (smaller files).

    The tokenizer files (`TOKENIZER_FILES`) are copied too, so the folder runs with `dsv3 generate`:
    `tokenizer` is the folder holding them; by default (None) the folder the model was loaded from
    (`model.source_path`, set by `load_model`) when it has a `tokenizer.json`; False writes none."""
    path = Path(path)
    tokenizer_dir = _tokenizer_dir(model, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, mtp_copies)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    n = len(shards)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, file_name in zip(shards, file_names):
        _atomic(path / file_name, lambda tmp, s=shard: _save_shard(s, tmp))
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: f for shard, f in zip(shards, file_names) for name in shard}}
        _atomic(path / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    config = model.args.to_hf_config()
    config["torch_dtype"] = _dtype_name(model.embed_tokens.weight.dtype)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = tokenizer_dir / name
            same = (path / name).exists() and src.exists() and (path / name).samefile(src)  # saved in place
            if src.is_file() and not same:
                _atomic(path / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    _atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return path


def _tokenizer_dir(model: Transformer, tokenizer: str | Path | bool | None) -> Path | None:
    """The folder whose tokenizer files `save_model` copies (see there), or None."""
    if tokenizer is False:
        return None
    if tokenizer is None or tokenizer is True:
        source = getattr(model, "source_path", None)
        if source is None or not (Path(source) / "tokenizer.json").is_file():
            if tokenizer is True:
                raise FileNotFoundError("tokenizer=True: the model was not loaded from a folder with tokenizer.json")
            return None
        return Path(source)
    folder = Path(tokenizer)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer={str(folder)!r}: no tokenizer.json in that folder")
    return folder


def _save_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})
    set_normal_mode(file)  # safetensors creates files 0600


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)
