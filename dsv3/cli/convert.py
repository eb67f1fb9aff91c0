"""`dsv3 convert fp8-to-bf16 | bf16-to-fp8`: checkpoint folders between the official FP8 layout and BF16,
through `dsv3.checkpoint.convert` (streaming, one shard at a time, no model built). `dsv3 convert shard --tp N
--ep M`: a folder pre-split for N x M ranks (`dsv3.checkpoint.shard`), which torchrun loads rank by rank."""

from __future__ import annotations

import argparse

from dsv3.cli.flags import positive_int

DIRECTIONS = {"fp8-to-bf16": "dequantize an FP8 checkpoint to BF16",
              "bf16-to-fp8": "quantize a BF16 checkpoint to block-wise FP8"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Convert an HF-format DeepSeek-V3 checkpoint folder between the official FP8 layout "
                     "(128x128-block e4m3 + weight_scale_inv) and BF16, one shard at a time.")
    directions = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    for direction, help_text in DIRECTIONS.items():
        v = directions.add_parser(direction, help=help_text, description=help_text)
        v.add_argument("--input", required=True, metavar="DIR", help="input checkpoint folder")
        v.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
        if direction == "bf16-to-fp8":
            v.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                           help="round block scales up to powers of two (DeepSeek-V3.1 style) (default: exact)")
        v.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
        v.set_defaults(run=run)
    v = directions.add_parser("shard", help="pre-split a checkpoint for tensor/expert-parallel inference",
                              description="Write one folder per rank (rank-R/model.safetensors, HF names, MTP "
                                          "layers kept) for --tp N x --ep M ranks, so that `torchrun "
                                          "--nproc-per-node N*M ... --tp N --ep M` reads each rank's file whole. "
                                          "FP8 stays FP8 (splits must fall on 128-blocks).")
    v.add_argument("--input", required=True, metavar="DIR", help="input checkpoint folder")
    v.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    v.add_argument("--tensor-parallel-size", "--tp", type=positive_int, default=1, metavar="N",
                   help="ranks splitting heads, vocabulary and MLPs (default: %(default)s)")
    v.add_argument("--expert-parallel-size", "--ep", type=positive_int, default=1, metavar="M",
                   help="ranks splitting the routed experts (default: %(default)s)")
    v.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    v.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.checkpoint.convert import bf16_to_fp8, fp8_to_bf16

    if args.direction == "shard":
        from dsv3.checkpoint.shard import convert_shard
        out = convert_shard(args.input, args.output, args.tensor_parallel_size, args.expert_parallel_size,
                            force=args.force)
    elif args.direction == "fp8-to-bf16":
        out = fp8_to_bf16(args.input, args.output, force=args.force)
    else:
        out = bf16_to_fp8(args.input, args.output, scale_fmt=args.scale_fmt, force=args.force)
    print(f"wrote {out}")
    return 0
