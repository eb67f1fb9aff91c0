"""The DeepSeek-V3 pre-training loop: recipe, step, validation, metrics, checkpoints, resume, export.

A recipe is a JSON file whose keys are the fields of `TrainConfig` (`model` is a preset name such as
`tiny`, a path to a ModelArgs JSON, or an inline dict of ModelArgs fields; its `vocab_size` may be left out
to take the data's). `dsv3 train` turns every field into a flag as well.

One optimizer step = `grad_accum` micro-batches of `batch_size` packed sequences per rank:
    loss = CE(next token) + (λ/D) Σ_k CE_k (MTP) + α Σ_layers L_bal (sequence-wise balance)
under bf16 autocast on float32 master weights (or the FP8 linears with `fp8`), then gradient clipping,
AdamW, the warm-up/constant/cosine schedule, and the gate-bias update from the step's expert counts.

Output folder: `metrics.jsonl` (one line per step), `tb/` (TensorBoard), `checkpoints/step_NNNNNNN/`
(`model/` in HF layout with float32 masters + `train_state.pt`: optimizer, scheduler, loader, balancer,
RNG states of every rank), `checkpoints/latest`, and at the end `model/` (HF layout in `export_dtype`,
with the data's tokenizer files) that `dsv3.load_model` and `transformers` read. Checkpoints are written
to a temporary folder and renamed, so a killed run leaves only complete ones; `resume` continues from
`latest` and reproduces the uninterrupted run bit for bit on the same hardware and world size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dsv3.config import PRESET_DIR, ModelArgs
from dsv3.model import Transformer
from dsv3.train.balance import BiasBalancer
from dsv3.train.expert_parallel import (clip_grad_norm_ep, expert_parameter_names, gather_full_state,
                                        gather_optimizer_state, load_optimizer_state, shard_experts)
from dsv3.train.fsdp import full_model_state, full_optimizer_state, is_sharded, load_full_optimizer_state
from dsv3.train.losses import model_balance_loss, mtp_losses, next_token_loss, sequence_balance_loss
from dsv3.train.optim import build_optimizer, build_scheduler, clip_in_fused_step, lr_at
from dsv3.train.parallelize import all_reduce_mean, init_distributed, parallelize, resolve_device

RECIPE_DIR = Path(__file__).parent / "recipes"
PRECISIONS = ("bf16", "fp32")
FP8_EXPERTS = {  # how `fp8` treats the routed experts
    "auto": "loop on a CPU, bf16 on a GPU",
    "loop": "an FP8 linear per expert on the reference loop (one host sync per MoE layer)",
    "grouped": "the grouped FP8 GEMM (Triton on CUDA, its PyTorch reference elsewhere): the report's numerics "
               "for every linear; on an H200 slower than bf16's grouped GEMM",
    "bf16": "the routed experts in the autocast precision on the grouped GEMM (the other linears FP8)",
}


@dataclass
class TrainConfig:
    model: Any = "tiny"  # preset name, ModelArgs JSON path, or dict of ModelArgs fields
    seq_len: int = 256  # tokens per packed sequence
    batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    final_lr: float = 3e-4  # floor after the cosine decay
    warmup_steps: int = 100
    decay_frac: float = 0.3  # fraction of `steps` spent in the cosine decay (at the end)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # λ early in training
    mtp_weight_late: float = 0.1  # λ after `mtp_switch_frac` of the steps
    mtp_switch_frac: float = 0.7
    balance_alpha: float = 1e-4  # α of the sequence-wise balance loss
    bias_update_rate: float = 1e-3  # γ of the bias update
    bias_update_rate_early: float | None = None  # γ for the first `bias_early_steps` steps (None: same)
    bias_early_steps: int = 0
    bias_freeze_step: int | None = None  # γ becomes 0 after this many steps (None: never)
    bias_freeze_tokens: int | None = None  # ... or after this many training tokens
    precision: str = "bf16"  # autocast dtype over float32 masters: bf16 or fp32 (no autocast)
    fp8: bool = False  # FP8 GEMMs in the linear layers
    fp8_experts: str = "auto"  # with fp8, the routed experts: auto, loop, grouped or bf16 (see FP8_EXPERTS)
    compile: bool = False  # torch.compile the blocks (whole blocks on the grouped MoE path)
    activation_checkpointing: bool = False
    data_parallel: str = "auto"  # under torchrun: fsdp (FSDP2 shards), ddp, or auto (fsdp where it applies)
    expert_parallel: bool = False  # under torchrun: routed experts spread over the ranks (all-to-all), rest DDP
    seed: int = 0
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    eval_batches: int = 20  # validation micro-batches per pass
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 10  # steps between log lines
    export_dtype: str = "bfloat16"  # dtype of the final HF export
    peak_tflops: float = 989.0  # accelerator peak (dense bf16) for MFU; H100/H200 spec
    device: str = "auto"  # auto, cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "warmup_steps", "eval_batches",
                    "keep_checkpoints", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "bias_early_steps", "weight_decay", "grad_clip", "balance_alpha", "bias_update_rate",
                     "mtp_weight", "mtp_weight_late", "final_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decay_frac", "mtp_switch_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.data_parallel not in ("auto", "fsdp", "ddp"):
            raise ValueError(f"data_parallel must be auto, fsdp or ddp, got {self.data_parallel!r}")
        if self.expert_parallel and (self.data_parallel == "fsdp" or self.compile):
            raise ValueError("expert_parallel runs with DDP for the replicated weights and without compile; "
                             "drop --data-parallel fsdp / --compile")
        if self.fp8_experts not in FP8_EXPERTS:
            raise ValueError(f"fp8_experts must be one of {tuple(FP8_EXPERTS)}, got {self.fp8_experts!r}")
        if self.expert_parallel and self.fp8 and self.fp8_experts == "grouped":
            raise ValueError("fp8_experts grouped does not apply under expert_parallel (its experts run one by "
                             "one); use loop or bf16")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.export_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"export_dtype must be bfloat16, float16 or float32, got {self.export_dtype!r}")
        if self.lr <= 0 or self.final_lr > self.lr:
            raise ValueError(f"need 0 < final_lr <= lr, got lr={self.lr}, final_lr={self.final_lr}")

    # ---- schedule --------------------------------------------------------------------------
    @property
    def decay_steps(self) -> int:
        return round(self.decay_frac * self.steps)

    @property
    def stable_steps(self) -> int:
        return max(0, self.steps - self.warmup_steps - self.decay_steps)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps, self.stable_steps, self.decay_steps, self.final_lr)

    def mtp_weight_at(self, step: int) -> float:
        return self.mtp_weight if step < self.mtp_switch_frac * self.steps else self.mtp_weight_late

    # ---- files -----------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a recipe (a path, or a name in `dsv3/train/recipes/`) and apply non-None overrides."""
        path = Path(path)
        if not path.exists() and (RECIPE_DIR / f"{path.name}.json").exists():
            path = RECIPE_DIR / f"{path.name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
            raise FileNotFoundError(f"recipe {str(path)!r} not found (built-in recipes: {names})")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe field(s) {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_args(cfg: TrainConfig, data_meta: dict | None = None) -> ModelArgs:
    """The ModelArgs of a recipe: float32 masters; vocabulary and BOS/EOS from the data when not given."""
    spec = cfg.model
    if isinstance(spec, str):
        path = Path(spec)
        if not path.exists() and (PRESET_DIR / f"{spec}.json").exists():
            path = PRESET_DIR / f"{spec}.json"
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r} is neither a preset in {PRESET_DIR} nor a JSON file")
        spec = json.loads(path.read_text())
        if spec.get("model_type"):
            spec = ModelArgs.from_hf_config(spec).to_json()
    spec = dict(spec)
    if data_meta is not None:
        spec.setdefault("vocab_size", data_meta["vocab_size"])
        spec.setdefault("bos_token_id", data_meta.get("bos_id", 0))
        spec.setdefault("eos_token_id", data_meta.get("eos_id", 1))
        if spec["vocab_size"] < data_meta["vocab_size"]:
            raise ValueError(f"model vocab_size {spec['vocab_size']} is smaller than the data's "
                             f"vocabulary ({data_meta['vocab_size']})")
    spec["dtype"] = "float32"
    args = ModelArgs(**spec)
    if args.max_seq_len < cfg.seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    return args


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 × active matmul parameters (MTP modules and the
    head they share included) + causal attention scores/values."""
    from dsv3.model.counts import count_parameters
    counts = count_parameters(args)
    expert = 3 * args.dim * args.moe_inter_dim
    unused_per_moe_layer = expert * (args.n_routed_experts - args.n_activated_experts)
    head = args.dim * args.vocab_size
    d = args.num_nextn_predict_layers
    mtp_active = counts.mtp - d * unused_per_moe_layer + d * head
    matmul = counts.activated_no_embedding + mtp_active
    attention = 3 * (args.n_layers + d) * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    return 6.0 * matmul + attention


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Owns the model, optimizer, schedule, balancer, loaders and output folder of one run."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False) -> None:
        from dsv3.train.data import PackedLoader, read_meta

        self.cfg, self.data_dir, self.out = cfg, Path(data_dir), Path(out_dir)
        self.info, self.device = init_distributed(resolve_device(cfg.device))
        meta = read_meta(self.data_dir)
        self.data_meta = meta
        self.args = model_args(cfg, meta)
        self.ckpt_dir = self.out / "checkpoints"
        latest = self._latest_checkpoint()
        if resume and latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if not resume and latest is not None:
            raise FileExistsError(f"{self.out} already holds checkpoints ({latest.name}); pass --resume to "
                                  "continue that run or choose another --out")

        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.args, dtype=torch.float32).to(self.device)
        self.model.train()
        self.step = 0
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.info.world_size
        self.loader = PackedLoader(self.data_dir, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                                   rank=self.info.rank, world_size=self.info.world_size)
        self.balancer = BiasBalancer(self.model, cfg.bias_update_rate, cfg.bias_freeze_step, cfg.bias_freeze_tokens,
                                     early_rate=cfg.bias_update_rate_early, early_steps=cfg.bias_early_steps)
        state = None
        if resume:
            state = self._load_checkpoint(latest)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before any sharding
        self.ep = cfg.expert_parallel and self.info.distributed
        if self.ep:
            shard_experts(self.model, self.info.rank, self.info.world_size)
        self.module = parallelize(self.model, self.info, self.device, fp8=cfg.fp8, fp8_experts=cfg.fp8_experts,
                                  activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                  data_parallel="ddp" if self.ep else cfg.data_parallel,
                                  ddp_ignore=expert_parameter_names(self.model) if self.ep else ())
        self.sharded = is_sharded(self.model)
        # with --compile the losses fuse too: the CE reads the bf16 logits once instead of via float32 copies
        self.ce = torch.compile(next_token_loss, dynamic=False) if cfg.compile else next_token_loss
        self.balance_loss = (torch.compile(sequence_balance_loss, dynamic=False) if cfg.compile
                             else sequence_balance_loss)
        self.optimizer = build_optimizer(self.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr, cfg.warmup_steps, cfg.stable_steps,
                                         cfg.decay_steps, cfg.final_lr)
        if state is not None:
            if self.sharded:
                load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
            elif self.ep:
                load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.flops_per_token = flops_per_token(self.args, cfg.seq_len)
        self.writer = None
        self.history: list[dict] = []

    # ---- checkpoints ---------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        if not (path / "train_state.pt").is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete")
        return path

    def _load_checkpoint(self, path: Path) -> dict:
        from dsv3.checkpoint import load_model
        loaded = load_model(path / "model", device="cpu", dtype=torch.float32, progress=False)
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        if state["world_size"] != self.info.world_size:
            raise ValueError(f"checkpoint {path.name} was written by {state['world_size']} rank(s), "
                             f"this run has {self.info.world_size}")
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.balancer.load_state_dict(state["balancer"])
        _set_rng_state(state["rng"][self.info.rank])
        return state

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_NNNNNNN` atomically (rank 0), then point `latest` at it."""
        from dsv3.checkpoint import save_model
        rngs = [None] * self.info.world_size
        if self.info.distributed:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        name = f"step_{self.step:07d}"
        final = self.ckpt_dir / name
        # FSDP2 / expert parallel: full tensors gathered to rank 0 (every rank takes part), optimizer state keyed
        # by parameter name
        model_state = self.full_state_model() if self.sharded or self.ep else self.model
        if self.sharded:
            optim_state = full_optimizer_state(self.model, self.optimizer)
        elif self.ep:
            optim_state = gather_optimizer_state(self.model, self.optimizer)
        else:
            optim_state = self.optimizer.state_dict()
        if self.info.is_main:
            tmp = self.ckpt_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(model_state, tmp / "model")
            torch.save({"step": self.step, "world_size": self.info.world_size, "config": self.cfg.to_json(),
                        "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                        "loader": self.loader.state_dict(), "balancer": self.balancer.state_dict(),
                        "rng": rngs}, tmp / "train_state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.ckpt_dir / ".latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, self.ckpt_dir / "latest")
            kept = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
            for old in kept[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.info.distributed:
            dist.barrier()
        return final

    def full_state_model(self, dtype: str = "float32") -> Transformer | None:
        """A CPU `Transformer` in `dtype` holding the full weights and buffers, on rank 0 (None elsewhere). With
        FSDP2 the shards are gathered first, so every rank must call this."""
        state = full_model_state(self.model) if self.sharded else gather_full_state(self.model) if self.ep else None
        if not self.info.is_main:
            return None
        if state is None:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        with torch.device("meta"):
            model = Transformer(self.args.replace(dtype=dtype))
        model.to_empty(device="cpu")
        model.load_state_dict(state)
        return model

    def export(self) -> Path:
        """Final HF-format folder `out/model` in `export_dtype`, with the data's tokenizer files."""
        from dsv3.checkpoint import save_model
        path = self.out / "model"
        export = self.full_state_model(self.cfg.export_dtype)
        if self.info.is_main:
            save_model(export, path)
            given = Path(self.data_meta.get("tokenizer", ""))  # relative to the shard folder (older: to cwd)
            tok_dir = given if given.is_absolute() else Path(self.data_dir) / given
            if not (tok_dir / "tokenizer.json").is_file():
                tok_dir = given
            if not (tok_dir / "tokenizer.json").is_file():
                tqdm.write(f"note: tokenizer {tok_dir} (from {self.data_dir}/meta.json) not found from "
                           f"{Path.cwd()}; copy tokenizer.json into {path} yourself")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (tok_dir / name).is_file():
                    shutil.copyfile(tok_dir / name, path / name)
        if self.info.distributed:
            dist.barrier()
        return path

    # ---- one step ------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, ...]:
        with self._autocast():
            logits, mtp_logits = self.module(inputs, return_mtp=True, absorb=False)
        ce = self.ce(logits, targets)
        per_depth = mtp_losses(mtp_logits, targets, self.ce)
        mtp = torch.stack(per_depth).mean() if per_depth else torch.zeros((), device=ce.device)
        balance = model_balance_loss(self.model, inputs.shape[1], self.cfg.balance_alpha,
                                     self.balance_loss).to(ce.device)
        return ce + mtp_weight * mtp + balance, ce, mtp, balance

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its (rank-averaged) metrics.

        Everything is launched before the first host read (the metrics, the load counts), so the GPU does not
        drain mid-step; a non-finite loss is detected after the update was launched, which is harmless since
        the run then stops and the last checkpoint on disk predates it."""
        cfg = self.cfg
        start = time.perf_counter()
        mtp_weight = cfg.mtp_weight_at(self.step)
        sums = torch.zeros(4, device=self.device)
        for micro in range(cfg.grad_accum):
            inputs, targets = next(self.loader)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            sync = last or not self.info.distributed
            if self.sharded:  # FSDP2: reduce-scatter only after the last micro-batch
                self.module.set_requires_gradient_sync(sync)
            with nullcontext() if sync or self.sharded else self.module.no_sync():
                loss, ce, mtp, balance = self._losses(inputs, targets, mtp_weight)
                (loss / cfg.grad_accum).backward()
            if not last:
                self.balancer.observe()  # the last micro-batch's routing is counted after the update launch
            sums += torch.stack([loss.detach(), ce.detach(), mtp.detach(), balance.detach()])
        if self.ep:  # the global norm: owned experts summed over ranks
            grad_norm = clip_grad_norm_ep(self.model, cfg.grad_clip or float("inf"))
        elif cfg.grad_clip and not self.sharded and self.optimizer.defaults.get("fused"):
            grad_norm = clip_in_fused_step(self.optimizer, cfg.grad_clip)  # applied inside the fused AdamW
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm over all shards
            grad_norm = grad_norm.full_tensor()
        values = all_reduce_mean(torch.cat([sums / cfg.grad_accum, grad_norm.detach().float().view(1)]), self.info)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.observe()
        loss, ce, mtp, balance, gnorm = values.tolist()
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            latest = self._latest_checkpoint()
            kept = f"last good checkpoint: {latest}" if latest else "no checkpoint was written yet"
            raise RuntimeError(f"loss is {loss} (grad norm {gnorm}) at step {self.step + 1}; stopping ({kept})")
        bias_rate = self.balancer.current_rate()
        load = self.balancer.step(self.tokens_per_step)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        tokens_per_s = self.tokens_per_step / seconds
        record = {"step": self.step, "loss": loss, "ce": ce, "mtp": mtp, "balance": balance, "grad_norm": gnorm,
                  "lr": lr, "mtp_weight": mtp_weight, "bias_rate": bias_rate,
                  "tokens": self.step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * self.flops_per_token / (self.cfg.peak_tflops * 1e12 * self.info.world_size)
                  if self.device.type == "cuda" else None}
        if load is not None:
            record["load_max"], record["load_min"] = load.worst_max, load.worst_min
            record["load_max_per_layer"] = [round(v, 4) for v in load.max_ratio.tolist()]
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token CE over the first `eval_batches` windows of the validation split (all ranks)."""
        from dsv3.train.data import PackedLoader
        try:
            loader = PackedLoader(self.data_dir, "val", self.cfg.seq_len, self.cfg.batch_size, seed=self.cfg.seed,
                                  rank=self.info.rank, world_size=self.info.world_size, shuffle=False)
        except ValueError:
            return None  # validation split too small for one batch
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.eval_batches):
            inputs, targets = next(loader)
            with self._autocast():
                logits = self.model(inputs.to(self.device), absorb=False)
            total += next_token_loss(logits, targets.to(self.device))
        return all_reduce_mean(total / self.cfg.eval_batches, self.info).item()

    # ---- loop ----------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        step = record["step"]
        for key in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "tokens_per_s", "mfu", "load_max",
                    "load_min", "val_loss", "bias_rate"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", record[key], step)
        for i, v in enumerate(record.get("load_max_per_layer", [])):
            self.writer.add_scalar(f"load_max_over_mean/layer_{i}", v, step)

    def _open_writer(self) -> None:
        if not self.info.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            tqdm.write("tensorboard is not installed: metrics go to metrics.jsonl only")
            return
        self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)

    def fit(self) -> dict:
        """Train from the current step to `cfg.steps`, validating, logging and checkpointing; export at the end."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            (self.out / "recipe.json").write_text(json.dumps({**cfg.to_json(), "model": self.args.to_json()},
                                                             indent=2) + "\n")
        self._open_writer()
        main = self.info.is_main
        if main:
            mode = ("FSDP2" if self.sharded else "expert parallel + DDP" if self.ep else "DDP"
                    if self.info.distributed else "one process")
            tqdm.write(f"dsv3 train: {self.n_params / 1e6:.1f}M parameters, {self.tokens_per_step:,} tokens/step, "
                       f"{cfg.steps} steps, device {self.device}, world {self.info.world_size} ({mode}), "
                       f"{'fp8' if cfg.fp8 else cfg.precision}{', compiled' if cfg.compile else ''}")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not main, dynamic_ncols=True)
        last: dict = {}
        val_loss = None
        while self.step < cfg.steps:
            record = self.train_step()
            done = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                val_loss = self.evaluate()
                record["val_loss"] = val_loss
            self._log(record)
            self.history.append(record)
            last = record
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if main and (self.step % cfg.log_every == 0 or done or self.step == 1):
                tqdm.write(self._line(record))
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        path = self.export()
        if self.writer is not None:
            self.writer.close()
        if main:
            tqdm.write(f"exported {path}" + (f" (val loss {val_loss:.4f})" if val_loss is not None else ""))
        return {"step": self.step, "last": last, "val_loss": val_loss, "model": str(path), "history": self.history}

    @staticmethod
    def _line(r: dict) -> str:
        line = (f"step {r['step']:>6} | loss {r['loss']:.4f} | ce {r['ce']:.4f} | mtp {r['mtp']:.4f} | "
                f"bal {r['balance']:.2e} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | "
                f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            line += f" | mfu {100 * r['mfu']:.1f}%"
        if "load_max" in r:
            line += f" | load max/mean {r['load_max']:.2f} min/mean {r['load_min']:.2f}"
        if r.get("val_loss") is not None:
            line += f" | val {r['val_loss']:.4f}"
        return line


def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False) -> dict:
    """Build a `Trainer` and run it to `cfg.steps`; returns a summary (last metrics, val loss, export path)."""
    return Trainer(cfg, data_dir, out_dir, resume).fit()
