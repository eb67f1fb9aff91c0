"""LoRA adapter folders: a fine-tuned model stored as its base checkpoint plus low-rank weight deltas.

An adapter folder holds `adapter_config.json` (`{"format": "dsv3-lora", "base_model": "../default-model",
"rank": r}`, the base path relative to the folder), `adapter.safetensors` (for each adapted HF weight
`NAME`: `NAME.lora_A` `[r, in]` and `NAME.lora_B` `[out, r]`, the scale folded into B) and may hold its own
tokenizer files. `merge_adapter` writes the full model, `W + B @ A` in each weight's stored dtype, shard by
shard in the base's layout, into an ordinary checkpoint folder that every loader reads; `materialize` does so
once into a cache folder keyed by the adapter's bytes (`<cache>/<hash>/<adapter folder name>`). This is how
the built-in chat model ships (a few MB beside the base model instead of a second full copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3.checkpoint.files import set_normal_mode
from dsv3.checkpoint.load import weight_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "dsv3-lora"
DEFAULT_CACHE = Path.home() / ".cache" / "dsv3" / "models"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's config, with `base_model` resolved to an absolute path; errors name the file."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}") from None
    if cfg.get("format") != FORMAT or "base_model" not in cfg:
        raise ValueError(f"{file}: not a {FORMAT} adapter config (needs format and base_model)")
    base = (Path(path) / cfg["base_model"]).resolve()
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{file}: base model {base} is not a checkpoint folder")
    return {**cfg, "base_model": base}


def save_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, base_model: str | Path,
                 rank: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `factors` (HF name -> (A, B)) and the config, with `base_model` stored relative to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in sorted(factors.items()):
        tensors[f"{name}.lora_A"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_B"] = b.to(dtype).contiguous()
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    set_normal_mode(path / ADAPTER_WEIGHTS)
    rel = os.path.relpath(Path(base_model).resolve(), path.resolve())
    (path / ADAPTER_CONFIG).write_text(json.dumps({"format": FORMAT, "base_model": rel, "rank": rank,
                                                   "targets": len(factors)}, indent=2) + "\n")
    return path


def merge_adapter(path: str | Path, out: str | Path) -> Path:
    """Write base + adapter as a full checkpoint folder `out` (the base's shards, index, config and side files;
    the adapter's own tokenizer files win). Every adapted weight must exist in the base with its shape."""
    path, out = Path(path), Path(out)
    cfg = read_adapter_config(path)
    base = cfg["base_model"]
    factors = load_file(str(path / ADAPTER_WEIGHTS))
    names = {k.rsplit(".", 1)[0] for k in factors}
    files, _ = weight_files(base)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        for name in names & tensors.keys():
            w = tensors[name]
            a, b = factors[f"{name}.lora_A"].float(), factors[f"{name}.lora_B"].float()
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise ValueError(f"{path / ADAPTER_WEIGHTS}: {name} delta is {b.shape[0]}x{a.shape[1]}, "
                                 f"the base weight {tuple(w.shape)}")
            tensors[name] = (w.float() + b @ a).to(w.dtype)
            done.add(name)
        save_file(tensors, str(out / file.name), metadata=metadata)
        set_normal_mode(out / file.name)
    missing = names - done
    if missing:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: weights not in the base model {base}: {sorted(missing)[:3]}")
    for side in sorted(base.iterdir()):
        if side.is_file() and not side.name.endswith(".safetensors") and not (path / side.name).exists():
            shutil.copyfile(side, out / side.name)
    for side in sorted(path.iterdir()):
        if side.is_file() and side.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(side, out / side.name)
    return out


def materialize(path: str | Path, cache: str | Path = DEFAULT_CACHE) -> Path:
    """The merged checkpoint folder of the adapter at `path`, built once into `cache/<hash>/<name>` (the hash of
    the adapter's files and the names and sizes of the base's shards; the folder keeps the adapter's name, which
    `dsv3 serve` offers as the model id) and reused after."""
    path = Path(path)
    cfg = read_adapter_config(path)
    digest = hashlib.sha256()
    for file in (path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS, *weight_files(cfg["base_model"])[0]):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
    digest.update((path / ADAPTER_WEIGHTS).read_bytes())
    target = Path(cache).expanduser() / digest.hexdigest()[:12] / path.resolve().name  # keeps the adapter's name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        merge_adapter(path, tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it 0700
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
