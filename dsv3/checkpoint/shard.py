"""Reading and writing one rank's part of a checkpoint (tensor and expert parallel inference).

`read_part(f, name, part, scale)` reads only `[start, stop)` along one dim of checkpoint tensor `name` through
`safe_open(...).get_slice` (safetensors reads just those bytes from the memory-mapped file); FP8 tensors come
with the matching rows or columns of 128-blocks of their `weight_scale_inv`. A part that does not fall on
128-blocks is read on the enclosing blocks, dequantized, and cut (float32, as a BF16 load wants it).

`dsv3 convert shard --tp N --ep M` (`convert_shard`) pre-splits a folder: `OUT/rank-{r}/model.safetensors` holds
rank r's tensors under their HF names (MTP layers kept), `OUT/parallel.json` the layout, and `OUT/config.json`
plus the tokenizer files sit beside them, so `load_model(OUT)` under a torchrun of the same layout reads
each rank's file whole. Which slice goes to which rank is `dsv3.model.parallel`'s `ShardPlan`, as for loading.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv3.checkpoint.files import FP8_DTYPE_NAMES, open_shard, set_normal_mode
from dsv3.checkpoint.names import hf_to_ours, shared_copy_of
from dsv3.parallel import ParallelLayout

BLOCK = 128
LAYOUT_FILE = "parallel.json"
SCALE_SUFFIX = "_scale_inv"


def rank_dir(rank: int) -> str:
    return f"rank-{rank}"


def read_layout(path: Path) -> ParallelLayout | None:
    """The layout a pre-split folder was written for (its `parallel.json`), or None for a plain folder."""
    file = path / LAYOUT_FILE
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return ParallelLayout(int(data["tp"]), int(data["ep"]))


def presplit_source(path: Path, layout: ParallelLayout) -> Path:
    """Where this rank's tensors are: `path` itself, or its `rank-{r}` folder when `path` was pre-split (then
    for exactly this layout)."""
    saved = read_layout(path)
    if saved is None:
        return path
    if (saved.tp, saved.ep) != (layout.tp, layout.ep):
        raise ValueError(f"{path} was split for --tp {saved.tp} --ep {saved.ep} ({saved.world} processes); "
                         f"got --tp {layout.tp} --ep {layout.ep}")
    return path / rank_dir(layout.rank)


def _narrow(sl: Any, ndim: int, dim: int, start: int, stop: int) -> torch.Tensor:
    index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(ndim))
    return sl[index]


def read_part(f: Any, name: str, part: tuple[int, int, int] | None,
              scale: Callable[[tuple[int, int, int] | None], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checkpoint tensor `name` of open file `f` (whole, or `part = (dim, start, stop)` of it) and, for an FP8
    tensor, its block scale (`scale(block_part)` reads it, the same part in blocks). An FP8 part off the
    128-blocks comes back dequantized to float32, with no scale."""
    sl = f.get_slice(name)
    fp8 = sl.get_dtype() in FP8_DTYPE_NAMES
    if part is None:
        tensor = f.get_tensor(name)
        return tensor, (scale(None) if fp8 else None)
    dim, start, stop = part
    ndim = len(sl.get_shape())
    if not fp8:
        return _narrow(sl, ndim, dim, start, stop), None
    full = sl.get_shape()[dim]
    b0, b1 = start // BLOCK, math.ceil(stop / BLOCK)
    if start % BLOCK == 0 and (stop % BLOCK == 0 or stop == full):
        return _narrow(sl, ndim, dim, start, stop), scale((dim, b0, b1))
    from dsv3.kernels.fp8 import dequantize_weight
    lo, hi = b0 * BLOCK, min(b1 * BLOCK, full)  # the enclosing blocks
    dense = dequantize_weight(_narrow(sl, ndim, dim, lo, hi), scale((dim, b0, b1)), dtype=torch.float32)
    return dense.narrow(dim, start - lo, stop - start), None


def convert_shard(src: str | Path, out: str | Path, tp: int, ep: int, *, moe: str = "all-to-all",
                  force: bool = False, progress: bool = True) -> Path:
    """Write `src` split for `tp x ep` ranks into `out` (see the module docstring); returns `out`."""
    from safetensors.torch import save_file

    from dsv3.checkpoint.load import read_args, weight_files
    from dsv3.model import Transformer
    from dsv3.model.layers import skip_torch_init
    from dsv3.model.parallel import parallelize_for_inference
    from dsv3.parallel import ParallelContext

    src, out = Path(src), Path(out)
    args = read_args(src)
    if read_layout(src) is not None:
        raise ValueError(f"{src} is already split for several ranks; convert the original folder")
    layout = ParallelLayout(tp, ep)
    from dsv3.model.parallel import check_layout
    check_layout(args, layout)  # before anything is written
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to overwrite")
    files, _ = weight_files(src)
    names: dict[Path, list[str]] = {}
    fp8 = False
    for file in files:
        with open_shard(file) as f:
            names[file] = list(f.keys())
            fp8 = fp8 or any(n.endswith(SCALE_SUFFIX) for n in names[file])
    out.mkdir(parents=True, exist_ok=True)
    for r in tqdm(range(layout.world), desc="writing rank shards", unit="rank", disable=not progress):
        with torch.device("meta"), skip_torch_init():
            model = Transformer(args)
            if fp8:  # FP8 stays FP8: the parts must fall on 128-blocks (checked here, before any writing)
                from dsv3.model.fp8_linear import convert_linears_to_fp8
                convert_linears_to_fp8(model)
        plan = parallelize_for_inference(model, ParallelContext(layout.at(r), torch.device("meta")), moe).shard_plan
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            with open_shard(file) as f:
                for name in names[file]:
                    if name.endswith(SCALE_SUFFIX):
                        continue
                    key = hf_to_ours(name, args.n_layers)
                    key = shared_copy_of(key) or key  # MTP copies of the embedding/head split like them
                    if key in plan.elsewhere:
                        continue

                    def scale(blocks, name=name, f=f):
                        s = f.get_slice(name + SCALE_SUFFIX)
                        return s[:] if blocks is None else _narrow(s, 2, *blocks)
                    tensor, s = read_part(f, name, plan.slices.get(key), scale)
                    tensors[name] = tensor.contiguous()
                    if s is not None:
                        tensors[name + SCALE_SUFFIX] = s.contiguous()
        target = out / rank_dir(r)
        target.mkdir(exist_ok=True)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        set_normal_mode(target / "model.safetensors")
    for extra in src.iterdir():  # config, tokenizer, generation config: beside the rank folders
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != "model.safetensors.index.json":
            shutil.copy2(extra, out / extra.name)
    (out / LAYOUT_FILE).write_text(json.dumps({"tp": tp, "ep": ep}, indent=2) + "\n")
    return out
