"""`dsv3 train`: the pre-training recipe from the command line.

    dsv3 train --config RECIPE.json --data DIR --out DIR [--resume] [--steps N] [--device D] [--fp8] ...
    torchrun --nproc-per-node 8 -m dsv3.cli train ...   (data parallel over the ranks)

`--config` takes a path or the name of a built-in recipe (`dsv3/train/recipes/*.json`). Every field of
`TrainConfig` is also a flag (`--lr 1e-3`, `--batch-size 16`, `--compile`, ...); a flag given on the command
line overrides the recipe, one left out keeps the recipe's value (shown as the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

import torch

from dsv3.train.trainer import FP8_EXPERTS, TrainConfig, train

_HELP = {
    "model": "model preset name, ModelArgs JSON path (recipe value by default)",
    "device": "auto, cpu, cuda or cuda:N",
    "data_parallel": "under torchrun: fsdp (FSDP2, parameters and optimizer state sharded over ranks), ddp, or "
                     "auto = fsdp when the MoE runs its grouped path, else ddp",
    "fp8_experts": "with --fp8, the routed experts' path: " + "; ".join(f"{k} = {v}" for k, v in FP8_EXPERTS.items()),
    "expert_parallel": "under torchrun: each rank keeps E/world routed experts per MoE layer and tokens reach "
                       "them by all-to-all; the other weights are replicated with DDP",
}


def _flag_type(tp: typing.Any) -> type | None:
    """The scalar type of a dataclass field annotation (`int | None` -> int); None for bools."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return None
    return tp if tp in (int, float, str) else str



def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `dsv3 train`."""
    p = subparsers.add_parser("train", help="pre-train a DeepSeek-V3 model on token shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe JSON file or built-in recipe name (e.g. small, tiny)")
    p.add_argument("--data", required=True, help="token shard folder written by `dsv3 data tokenize`")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, TensorBoard, final model/")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (default: off)")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    fields = p.add_argument_group("recipe fields (override the recipe; default = recipe value)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        help_text += f" (built-in default {getattr(defaults, f.name)!r})"
        if tp is None:
            fields.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            fields.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig.from_json(args.config, **overrides)
        train(cfg, args.data, args.out, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"dsv3 train: error: {err}", file=sys.stderr)
        return 1
    if torch.distributed.is_initialized():  # every rank got here: leave the group together (PyTorch's advice)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
