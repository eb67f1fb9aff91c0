"""`dsv3 train`: the pre-training recipe from the command line.

    dsv3 train --config RECIPE.json --data DIR --out DIR [--resume] [--steps N] [--device D] [--fp8] ...
    torchrun --nproc-per-node 8 -m dsv3.cli train ...   (data parallel over the ranks)

Checkpoints (`--ckpt-every`) are torch.distributed.checkpoint folders: `--resume` continues from the newest
intact one at any world size and parallel mode (keep the global batch: ranks x --batch-size), and refuses a
changed schedule (--steps, --lr, ...) unless --allow-changed-settings. SIGTERM or Ctrl-C (once) finishes the
step, saves a checkpoint and exits 0; so does --time-limit before the given wall time. Each checkpoint's
`model/` folder (HF layout, with the tokenizer) runs with `dsv3 generate` and `dsv3 eval`.
`--precision auto` (the default) trains in fp32 on a CPU and with bf16 autocast on a GPU.

`--config` takes a path or the name of a built-in recipe (`dsv3/train/recipes/*.json`). Every field of
`TrainConfig` is also a flag (`--lr 1e-3`, `--batch-size 16`, `--compile`, ...); a flag given on the command
line overrides the recipe, one left out keeps the recipe's value. The flags are made from the dataclass, so
this verb imports the trainer (and torch) while its parser is built; other verbs do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from dsv3.cli.flags import RawDescriptionFormatter

_HELP = {
    "model": "model preset name, ModelArgs JSON path",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "data_parallel": "under torchrun: fsdp (FSDP2, parameters and optimizer state sharded over ranks), ddp, or "
                     "auto = fsdp when the MoE runs its grouped path, else ddp",
    "expert_parallel": "under torchrun: each rank keeps E/world routed experts per MoE layer and tokens reach "
                       "them by all-to-all; the other weights are replicated with DDP",
    "precision": "auto (fp32 on a CPU, bf16 on a GPU), bf16 (autocast over float32 masters) or fp32",
    "fp8": "FP8 GEMMs with the DeepSeek-V3 report's 1x128 / 128x128 scaling (forward, dgrad, wgrad) for the GEMMs "
           "--fp8-layers picks; the rest run in --precision",
    "time_limit": "stop with a checkpoint before this much wall time, e.g. 3600, 90m, 2h, 1:30:00 (for schedulers)",
    "async_checkpoint": "write checkpoints' DCP state in a background thread while training goes on",
}


def _flag_type(tp: typing.Any) -> type | None:
    """The scalar type of a dataclass field annotation (`int | None` -> int); None for bools."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return None
    return tp if tp in (int, float, str) else str


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsv3.train.recipe import FP8_EXPERTS, FP8_LAYERS, TrainConfig

    p.description = __doc__
    p.formatter_class = RawDescriptionFormatter
    p.add_argument("--config", required=True, help="recipe JSON file or built-in recipe name (e.g. small, tiny)")
    p.add_argument("--data", required=True, metavar="DIR", help="token shard folder written by `dsv3 data tokenize`")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: checkpoints, metrics, TensorBoard, final model/")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out, at any world size (default: off)")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: accept a changed schedule (--steps, --lr, ...), with a warning (default: "
                        "refused)")
    helps = {**_HELP, "fp8_experts": "with --fp8, the routed experts' path: "
                                     + "; ".join(f"{k} = {v}" for k, v in FP8_EXPERTS.items()),
             "fp8_layers": "with --fp8, which GEMMs run in FP8 (the choice is printed at start): "
                           + "; ".join(f"{k} = {v}" for k, v in FP8_LAYERS.items())}
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    fields = p.add_argument_group("recipe fields (override the recipe; default = the recipe's value)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        help_text = helps.get(f.name, f.name.replace("_", " ")) + f" (built-in default {getattr(defaults, f.name)!r})"
        if tp is None:
            fields.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            fields.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsv3.train.recipe import TrainConfig
    from dsv3.train.trainer import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_json(args.config, **overrides)
    train(cfg, args.data, args.out, resume=args.resume, allow_changes=args.allow_changed_settings)
    if torch.distributed.is_initialized():  # every rank got here: leave the group together (PyTorch's advice)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
