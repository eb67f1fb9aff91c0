"""Write a `Transformer` as an HF-format folder: `config.json`, safetensors shards, and the index.

Names follow `dsv3.checkpoint.names`; each MTP layer also gets copies of the shared embedding and head
(`embed_tokens`, `shared_head.head`) as in the official release. Files are written under temporary names
and renamed when complete, so an interrupted save leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.checkpoint.files import set_normal_mode
from dsv3.checkpoint.names import SHARED_COPIES, ours_to_hf
from dsv3.config import _dtype_name
from dsv3.model import Transformer


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
               mtp_copies: bool = True) -> Path:
    """Save into `path` (created if needed). Returns the path. `mtp_copies=False` leaves out the copies of
    the embedding and head that the official layout repeats in each MTP layer (smaller files)."""
    path = Path(path)
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
    _atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return path


def _save_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})
    set_normal_mode(file)  # safetensors creates files 0600


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)
