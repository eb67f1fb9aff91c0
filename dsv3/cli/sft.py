"""`dsv3 sft`: supervised fine-tuning of a checkpoint on chat conversations (`dsv3.train.sft`).

    dsv3 data chat --output data/chat
    dsv3 sft --base dsv3/assets/default-model --data data/chat --out runs/chat --device cuda

`--data` is a folder holding train.jsonl (and val.jsonl, scored before and after) or one .jsonl file. The
tuned model is written to `--out` in HF layout with the base's tokenizer, so `dsv3 chat --model OUT` runs it;
this is how the built-in chat model (`dsv3/assets/default-chat-model`) was made from the built-in base model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dsv3.cli.flags import RawDescriptionFormatter, UsageError, device_name, nonnegative_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = RawDescriptionFormatter
    p.add_argument("--base", required=True, metavar="DIR", help="checkpoint folder to start from (with its tokenizer)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="folder with train.jsonl [and val.jsonl] from `dsv3 data chat`, or one .jsonl file")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the tuned model and sft_metrics.jsonl")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=positive_int, default=4, help="passes over the training conversations")
    p.add_argument("--batch-size", type=positive_int, default=32, help="conversations per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--final-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--lora-rank", type=positive_int, default=32,
                   help="rank of the adapters on every Linear but the routed experts (the base stays frozen)")
    p.add_argument("--warmup-steps", type=positive_int, default=20, help="linear warm-up steps")
    p.add_argument("--mtp-weight", type=nonnegative_float, default=0.1, help="weight of the MTP loss")
    p.add_argument("--max-len", type=positive_int, default=512, help="tokens kept per conversation")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.train.sft import SFTConfig, sft

    if not (Path(args.base) / "config.json").is_file():
        raise UsageError(f"--base {args.base} is not a checkpoint folder (no config.json)")
    data = Path(args.data)
    train, val = (data / "train.jsonl", data / "val.jsonl") if data.is_dir() else (data, None)
    if not train.is_file():
        raise UsageError(f"no training conversations at {train} (make them with `dsv3 data chat`)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here")
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    cfg = SFTConfig(**{k: v for k, v in vars(args).items() if k in fields})
    s = sft(args.base, train, args.out, cfg, val if val and val.is_file() else None, args.device)
    before = f"{s['val_ce_before']:.3f} -> {s['val_ce_after']:.3f}" if s["val_ce_before"] is not None else "n/a"
    print(f"wrote {args.out}: {s['steps']} steps over {s['train_conversations']} conversations "
          f"({s['assistant_tokens']:,} answer tokens) in {s['seconds']} s; validation answer CE {before}")
    return 0
