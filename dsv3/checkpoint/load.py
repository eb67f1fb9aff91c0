"""Load an HF-format DeepSeek-V3/V2 folder into a `Transformer`, one safetensors shard at a time.

The model is built on the meta device and materialised empty on the target device, then each checkpoint
tensor is copied into place as its shard is read, so peak host memory is about one shard plus one tensor.
FP8 tensors (`float8_e4m3fn` with a `<name>_scale_inv` block scale) are dequantized on load. Every
problem (missing, unexpected, mis-shaped tensors) is collected and reported in one error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsv3.checkpoint.files import open_shard, read_weight_map
from dsv3.checkpoint.names import hf_to_ours, mtp_depth, ours_to_hf, shared_copy_of
from dsv3.checkpoint.shard import presplit_source, read_part
from dsv3.config import ModelArgs, _dtype_name
from dsv3.model import Transformer
from dsv3.model.layers import skip_torch_init
from dsv3.model.parallel import parallelize_for_inference
from dsv3.parallel import ParallelContext

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_LISTED = 12


def weight_files(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """The safetensors files of a checkpoint folder, and (when an index exists) the name -> file map."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_weight_map(index)
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files, {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files, {}


def read_args(path: str | Path) -> ModelArgs:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected an HF-format DeepSeek-V3 folder")
    return ModelArgs.from_hf_config(path)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{title} ({len(items)}): " + ", ".join(shown) + more


WEIGHTS = ("auto", "bf16", "fp8")  # how `load_model` keeps Linear weights in memory


def checkpoint_weights(names: Iterable[str]) -> str:
    """"fp8" for a checkpoint with FP8 block scales (`*_scale_inv` tensors), else "bf16"."""
    return "fp8" if any(n.endswith("_scale_inv") for n in names) else "bf16"


@torch.no_grad()
def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               *, weights: str = "bf16", progress: bool = True, tp: int | None = None, ep: int | None = None,
               parallel: ParallelContext | None = None, moe: str = "all-to-all") -> Transformer:
    """Read a checkpoint folder (`config.json` + `*.safetensors`, BF16 or FP8) into an eval-mode model.

    `weights="bf16"` dequantizes FP8 tensors at load (the model computes in `dtype`); `weights="fp8"` keeps
    FP8 weights in memory (`FP8Linear`: half the bytes; W8A16 or W8A8 by its policy, see
    `dsv3.model.fp8_linear`) for every Linear the official checkpoint quantizes, quantizing BF16 tensors if
    needed; `weights="auto"` keeps the checkpoint's own format on a CUDA device (FP8 stays FP8) and
    dequantizes FP8 on the CPU (no FP8 tensor cores there).

    A config announcing MTP layers whose tensors are absent (as `transformers`' `save_pretrained` writes)
    loads without MTP, with a warning.

    Parallel inference (`dsv3.model.parallel`): under torchrun, or with `tp`/`ep` given, the model is split over
    the world as `tp x ep` (default: `tp` = world, `ep` = 1) and each rank reads only its slices of the
    tensors (`dsv3.checkpoint.shard`), or its own file of a folder `dsv3 convert shard` wrote; `moe` chooses
    the routed experts' exchange ("all-to-all" or "all-reduce"). `parallel` passes a `ParallelContext` instead
    (`ParallelContext.single()`: one whole model, even under torchrun)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = Path(path)
    args = read_args(path).replace(dtype=_dtype_name(dtype))
    ctx = parallel if parallel is not None else ParallelContext.from_env(tp, ep, device)
    device = ctx.device if ctx.world > 1 else device
    source = presplit_source(path, ctx.layout)
    files, weight_map = weight_files(source)
    names_by_file = {}
    for file in files:
        with open_shard(file) as f:
            names_by_file[file] = list(f.keys())
    all_names = {n for names in names_by_file.values() for n in names}
    if weights == "auto":
        weights = checkpoint_weights(all_names) if torch.device(device).type == "cuda" else "bf16"
    if args.num_nextn_predict_layers:
        have = {mtp_depth(hf_to_ours(n, args.n_layers)) for n in all_names} - {None}
        if not have:
            warnings.warn(f"{path}: config has {args.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                          "has no MTP tensors; loading without MTP", stacklevel=2)
            args = args.replace(num_nextn_predict_layers=0)

    with torch.device("meta"), skip_torch_init():
        model = Transformer(args, dtype)
        if weights == "fp8":
            from dsv3.model.fp8_linear import convert_linears_to_fp8
            convert_linears_to_fp8(model)
        plan = parallelize_for_inference(model, ctx, moe).shard_plan
    model.to_empty(device=device)
    expected = model.state_dict()
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []

    def scale_of(name: str, f, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The block scale of FP8 tensor `name`, or `blocks = (dim, first, stop)` of it."""
        scale_name = f"{name}_scale_inv"
        if scale_name in f.keys():
            return read_part(f, scale_name, blocks, None)[0]
        if scale_name not in weight_map:
            raise ValueError(f"{path}: FP8 tensor {name} has no {scale_name}")
        with open_shard(weight_map[scale_name]) as g:
            return read_part(g, scale_name, blocks, None)[0]

    for file in tqdm(files, desc="loading shards", unit="shard", disable=not progress or len(files) < 2):
        with open_shard(file) as f:
            for name in names_by_file[file]:
                if name.endswith("_scale_inv"):
                    continue
                key = hf_to_ours(name, args.n_layers)
                depth = mtp_depth(key)
                if depth is not None and (depth >= args.num_nextn_predict_layers or shared_copy_of(key)):
                    continue  # MTP layer not loaded, or an MTP copy of the shared embedding/head
                if key in plan.elsewhere:
                    continue  # another rank's tensor (an expert it owns)
                if key not in expected:
                    unexpected.append(name)
                    continue
                tensor, scale = read_part(f, name, None if source != path else plan.slices.get(key),
                                          lambda blocks, name=name, f=f: scale_of(name, f, blocks))
                target = expected[key]
                if tuple(tensor.shape) != tuple(target.shape):
                    mismatched.append(f"{name}: checkpoint {list(tensor.shape)} vs model {list(target.shape)}")
                    continue
                scale_key = f"{key}_scale_inv"
                if target.dtype in FP8_DTYPES:  # FP8 in memory: copy FP8 + scale, or quantize BF16 now
                    from dsv3.kernels.fp8 import quantize_weight
                    tensor, scale = ((tensor, scale) if tensor.dtype in FP8_DTYPES
                                     else quantize_weight(tensor.float()))
                    expected[scale_key].copy_(scale)
                    loaded.add(scale_key)
                elif tensor.dtype in FP8_DTYPES:
                    from dsv3.kernels.fp8 import dequantize_weight
                    tensor = dequantize_weight(tensor, scale, dtype=torch.float32)
                target.copy_(tensor)
                loaded.add(key)

    missing = [f"{ours_to_hf(k, args.n_layers)} {list(v.shape)}" for k, v in expected.items() if k not in loaded]
    problems = [_listing(title, items) for title, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", mismatched))
                if items]
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config: " + "; ".join(problems))
    model.rotary.reset()
    model.source_path = path  # where it came from: `save_model` copies the tokenizer files from here
    return model.eval()
