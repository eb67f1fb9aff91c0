"""FP8 <-> BF16 conversion of HF-format DeepSeek-V3 checkpoint folders, streaming, at the safetensors level.

`fp8_to_bf16` dequantizes every `float8_e4m3fn` tensor with its `<name>_scale_inv` and drops the scales;
`bf16_to_fp8` quantizes exactly the tensors the official release stores in FP8 (2-D `.weight` of the
Linear layers, except the embeddings, `lm_head`, the MTP `shared_head.head` and `eh_proj`, and the MoE
router `mlp.gate`; norms and biases are 1-D) into 128×128-block e4m3 plus a float32 `weight_scale_inv`.
Every other tensor is copied bit for bit. No model is built.

Memory: input shards are opened with `safe_open` (memory-mapped) and read one tensor at a time; converted
tensors go into an output buffer that is written as a shard as soon as it would exceed `max_shard_bytes`
(default: the size of the largest input shard). Peak RAM is therefore about one shard plus one tensor,
whatever the size of the model.

Crash safety: shards are written under hidden `.partial` names and renamed at the end, then the index,
then `config.json` last, each via a temporary file and `os.replace`. An interrupted run leaves a folder
without `config.json` (and without any `*.safetensors` name), which no loader takes for a checkpoint;
temporary files are removed when the error is a Python exception.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dsv3.checkpoint.files import has_fp8_tensors, open_shard, read_json, read_weight_map, set_normal_mode
from dsv3.kernels.fp8 import SCALE_FMTS, dequantize_weight, quantize_weight
from dsv3.model.fp8_linear import keep_bf16

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK = 128
_PARTIAL = ".partial"


def fp8_quantization_config(scale_fmt: str | None = None) -> dict:
    """The `quantization_config` of an FP8 DeepSeek-V3 `config.json`."""
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    if scale_fmt is not None:
        cfg["scale_fmt"] = scale_fmt
    return cfg


def is_fp8_weight_name(name: str, shape: tuple[int, ...]) -> bool:
    """True for the tensors the official DeepSeek-V3 checkpoint stores as FP8 (by name and shape)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")]
    return not (keep_bf16(module) or module.endswith("embed_tokens") or "norm" in module.rsplit(".", 1)[-1])


# ---- reading the input ----


def _input_shards(src: Path) -> tuple[list[Path], dict[str, Path]]:
    """Shard files in order, and name -> file for every tensor (from the index, or by opening the files)."""
    index = src / INDEX_NAME
    if index.exists():
        weight_map = {name: src / file for name, file in read_weight_map(index).items()}
        files = sorted(set(weight_map.values()))
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files, weight_map
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    weight_map = {}
    for file in files:
        with open_shard(file) as f:
            weight_map.update({name: file for name in f.keys()})
    return files, weight_map


class _TensorReader:
    """Reads named tensors lazily (memory-mapped); keeps the shard being streamed open."""

    def __init__(self, weight_map: dict[str, Path]) -> None:
        self.weight_map = weight_map
        self._open: dict[Path, object] = {}

    def shard(self, file: Path):
        if file not in self._open:
            self.close()
            self._open[file] = open_shard(file)
        return self._open[file]

    def get(self, name: str, current: Path) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        if file == current:
            return self.shard(current).get_tensor(name)
        with open_shard(file) as f:  # e.g. a scale stored in another shard
            return f.get_tensor(name)

    def close(self) -> None:
        self._open.clear()


# ---- writing the output ----


class _ShardWriter:
    """Buffers converted tensors and writes a shard (hidden temp name) whenever the buffer would overflow."""

    def __init__(self, dst: Path, max_shard_bytes: int) -> None:
        self.dst, self.max_shard_bytes = dst, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []  # temp file, its tensor names
        self.total_bytes = 0

    def add(self, group: list[tuple[str, torch.Tensor]]) -> None:
        """Add tensors that belong in one shard (a weight and its scale)."""
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        for name, tensor in group:
            self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes
        if self.buffer_bytes >= self.max_shard_bytes:
            self.flush()  # a full shard (or one tensor bigger than a shard) leaves memory at once

    def flush(self) -> None:
        if not self.buffer:
            return
        tmp = self.dst / f".dsv3-convert-{len(self.parts) + 1:05d}.safetensors{_PARTIAL}"
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        set_normal_mode(tmp)
        self.parts.append((tmp, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Rename the parts to `model-0000i-of-0000n.safetensors`; return name -> file for the index."""
        self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.parts, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.dst / final)
            weight_map.update({name: final for name in names})
        return weight_map

    def discard(self) -> None:
        for tmp, _ in self.parts:
            tmp.unlink(missing_ok=True)
        self.parts, self.buffer = [], {}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + _PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + _PARTIAL)
    if src.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    else:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(".safetensors") or path.name == INDEX_NAME or path.name.endswith(".safetensors.index.json")


def _prepare_output(src: Path, dst: Path, force: bool) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"input checkpoint folder not found: {src}")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json; expected an HF-format DeepSeek-V3 folder")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output folder must differ from the input folder ({src})")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise ValueError(f"output folder {dst} exists and is not empty; pass --force (force=True) to overwrite it")
        # the completeness marker goes first, then every weight file that could mix with the new ones
        (dst / "config.json").unlink(missing_ok=True)
        for p in dst.iterdir():
            if p.is_file() and (_is_weight_file(p) or p.name.endswith(_PARTIAL)):
                p.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, code, README, ...: everything but the weights and config.json."""
    for p in sorted(src.iterdir()):
        if p.name == "config.json" or _is_weight_file(p) or p.name.startswith("."):
            continue
        if p.is_dir() and dst.resolve().is_relative_to(p.resolve()):
            continue  # the output folder itself, placed inside the input
        _copy_atomic(p, dst / p.name)


Convert = Callable[[str, torch.Tensor, _TensorReader, Path], Iterator[tuple[str, torch.Tensor]]]


def _convert_folder(
    src: Path, dst: Path, force: bool, convert: Convert, update_config: Callable[[dict], dict],
    max_shard_bytes: int | None, progress: bool, desc: str,
) -> Path:
    _prepare_output(src, dst, force)
    config = update_config(read_json(src / "config.json"))
    files, weight_map = _input_shards(src)
    names_by_file: dict[Path, list[str]] = {f: [] for f in files}
    for name, file in weight_map.items():
        names_by_file[file].append(name)
    if max_shard_bytes is None:
        max_shard_bytes = max(f.stat().st_size for f in files)
    reader = _TensorReader(weight_map)
    writer = _ShardWriter(dst, max_shard_bytes)
    try:
        with tqdm(total=len(weight_map), desc=desc, unit="tensor", disable=not progress) as bar:
            for file in files:
                for name in sorted(names_by_file[file]):
                    writer.add(list(convert(name, reader.get(name, file), reader, file)))
                    bar.update(1)
        reader.close()
        _copy_side_files(src, dst)
        out_map = writer.finish()
    except BaseException:
        reader.close()
        writer.discard()
        raise
    index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": dict(sorted(out_map.items()))}
    _write_text_atomic(dst / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    _write_text_atomic(dst / "config.json", json.dumps(config, indent=2) + "\n")  # last: marks completion
    return dst


def fp8_to_bf16(
    input_dir: str | Path, output_dir: str | Path, force: bool = False, *,
    max_shard_bytes: int | None = None, progress: bool = True,
) -> Path:
    """Dequantize an FP8 checkpoint folder into a BF16 one (scales dropped, `quantization_config` removed).

    A folder with neither FP8 tensors nor a `quantization_config` is refused (a ValueError saying it is not
    FP8): there is nothing to convert, and a copy under a new name would look like a conversion."""
    src = Path(input_dir)
    if src.is_dir() and (src / "config.json").exists() and "quantization_config" not in read_json(src / "config.json"):
        if not has_fp8_tensors(_input_shards(src)[0]):
            raise ValueError(f"{src} is not an FP8 checkpoint (no FP8 tensors, no quantization_config): "
                             "nothing to convert")

    def convert(name, tensor, reader, file):
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in reader.weight_map:
            return  # consumed with its weight
        if tensor.dtype in FP8_DTYPES:
            if tensor.dim() != 2:
                raise ValueError(f"FP8 tensor {name} has shape {tuple(tensor.shape)}; only 2-D weights are supported")
            if name + SCALE_SUFFIX not in reader.weight_map:
                raise ValueError(f"FP8 tensor {name} has no {name}{SCALE_SUFFIX} in {src}")
            scale = reader.get(name + SCALE_SUFFIX, file)
            tensor = dequantize_weight(tensor, scale, BLOCK, torch.bfloat16)
        yield name, tensor

    def update_config(cfg: dict) -> dict:
        cfg.pop("quantization_config", None)
        return cfg

    return _convert_folder(src, Path(output_dir), force, convert, update_config, max_shard_bytes, progress,
                           "fp8-to-bf16")


def bf16_to_fp8(
    input_dir: str | Path, output_dir: str | Path, scale_fmt: str | None = None, force: bool = False, *,
    max_shard_bytes: int | None = None, progress: bool = True,
) -> Path:
    """Quantize a BF16 (or FP16/FP32) checkpoint folder to the official FP8 layout (128×128 blocks)."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    src = Path(input_dir)
    if src.is_dir() and (src / "config.json").exists():
        if "quantization_config" in read_json(src / "config.json"):
            raise ValueError(f"{src} is already quantized (config.json has quantization_config)")

    def convert(name, tensor, reader, file):
        if tensor.dtype in FP8_DTYPES:
            raise ValueError(f"{src} already holds FP8 tensors ({name}); convert it to BF16 first")
        if is_fp8_weight_name(name, tuple(tensor.shape)) and tensor.is_floating_point():
            q, s = quantize_weight(tensor, BLOCK, scale_fmt)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, tensor

    def update_config(cfg: dict) -> dict:
        cfg["quantization_config"] = fp8_quantization_config(scale_fmt)
        return cfg

    return _convert_folder(src, Path(output_dir), force, convert, update_config, max_shard_bytes, progress,
                           "bf16-to-fp8")
