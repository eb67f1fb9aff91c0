"""The DeepSeek-V3 pre-training loop: step, validation, metrics, checkpoints, resume, export.

A recipe (`dsv3.train.recipe.TrainConfig`) is a JSON file whose keys are its fields (`model` is a preset name
such as `tiny`, a path to a ModelArgs JSON, or an inline dict of ModelArgs fields; its `vocab_size` may be left
out to take the data's). `dsv3 train` turns every field into a flag as well.

One optimizer step = `grad_accum` micro-batches of `batch_size` packed sequences per rank:
    loss = CE(next token) + (λ/D) Σ_k CE_k (MTP) + α Σ_layers L_bal (sequence-wise balance)
in `precision` (bf16 autocast over float32 master weights, or plain fp32; `auto` is fp32 on a CPU, where
bf16 autocast is several times slower, and bf16 on a GPU) or with the FP8 linears (`fp8`), then gradient
clipping, AdamW, the warm-up/constant/cosine schedule, and the gate-bias update from the step's expert counts.
`ce` and `mtp` are logged apart from the weighted total `loss` (which moves when λ switches).

Output folder: `metrics.jsonl` (one line per step, cut back to the resumed step on resume), `tb/`
(TensorBoard), `checkpoints/step_NNNNNNN/` (`dsv3.train.checkpoint`: DCP state that any world size and
parallel mode resumes from, `train_state.pt`, and `model/` in HF layout with the tokenizer), `checkpoints/latest`,
and at the end `model/` (HF layout in `export_dtype`, with the data's tokenizer files) that `dsv3.load_model`
and `transformers` read. `resume` continues from the newest intact checkpoint (a damaged one is named in a
warning and skipped), refuses changed settings that the run depends on (model, sequence length, global batch,
seed) and, unless allowed, a changed schedule (steps, learning rates, λ, γ, ...), and reproduces the
uninterrupted run bit for bit on the same hardware and world size (within float32 rounding on another).
SIGTERM or SIGINT (once) and `time_limit` end the run after the current step with a checkpoint (`StopRequest`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dsv3.model import Transformer
from dsv3.train import checkpoint as ckpt
from dsv3.train.balance import BiasBalancer
from dsv3.train.expert_parallel import clip_grad_norm_ep, expert_parameter_names, gather_full_state, shard_experts
from dsv3.train.fp8_select import plan_fp8
from dsv3.train.fsdp import full_model_state, is_sharded
from dsv3.train.losses import model_balance_loss, mtp_losses, next_token_loss, sequence_balance_loss
from dsv3.train.optim import build_optimizer, build_scheduler, clip_in_fused_step
from dsv3.train.parallelize import all_reduce_mean, init_distributed, parallelize, resolve_device
from dsv3.train.recipe import TrainConfig, flops_per_token, model_args
from dsv3.train.stop import StopRequest

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


# fields a resumed run must keep (it cannot continue otherwise), and the schedule, which it may change only
# when asked (`allow_changes`): the rest (evaluation, logging, checkpoint cadence, device, parallel mode,
# precision, fp8 and which GEMMs it takes, compile, ...) may differ freely: none changes a parameter's name or shape
FIXED_FIELDS = ("seq_len", "seed")
SCHEDULE_FIELDS = ("steps", "lr", "final_lr", "warmup_steps", "decay_frac", "weight_decay", "beta1", "beta2", "eps",
                   "grad_clip", "mtp_weight", "mtp_weight_late", "mtp_switch_frac", "balance_alpha",
                   "bias_update_rate", "bias_update_rate_early", "bias_early_steps", "bias_freeze_step",
                   "bias_freeze_tokens")


class Trainer:
    """Owns the model, optimizer, schedule, balancer, loaders and output folder of one run."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
                 allow_changes: bool = False) -> None:
        from dsv3.train.data import PackedLoader, read_meta

        self.cfg, self.data_dir, self.out = cfg, Path(data_dir), Path(out_dir)
        self.info, self.device = init_distributed(resolve_device(cfg.device))
        self.precision = cfg.precision if cfg.precision != "auto" else "bf16" if self.device.type == "cuda" else "fp32"
        meta = read_meta(self.data_dir)
        self.data_meta = meta
        self.args = model_args(cfg, meta)
        self.ckpt_dir = self.out / "checkpoints"
        existing = ckpt.candidates(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        if resume and not existing:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if not resume and existing:
            raise FileExistsError(f"{self.out} already holds checkpoints ({existing[0].name}); pass --resume to "
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
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before any sharding
        self.ep = cfg.expert_parallel and self.info.distributed
        if self.ep:
            shard_experts(self.model, self.info.rank, self.info.world_size)
        # which GEMMs run in FP8 (by shape on a GPU), printed at start
        self.fp8_plan = plan_fp8(self.model, self.device, cfg.fp8_layers, cfg.fp8_experts) if cfg.fp8 else None
        self.module = parallelize(self.model, self.info, self.device, fp8=self.fp8_plan,
                                  activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                  data_parallel="ddp" if self.ep else cfg.data_parallel,
                                  ddp_ignore=expert_parameter_names(self.model) if self.ep else ())
        self.sharded = is_sharded(self.model)
        self.mode = ("FSDP2" if self.sharded else "expert parallel + DDP" if self.ep else "DDP"
                     if self.info.distributed else "one process")
        # with --compile the losses fuse too: the CE reads the bf16 logits once instead of via float32 copies
        self.ce = torch.compile(next_token_loss, dynamic=False) if cfg.compile else next_token_loss
        self.balance_loss = (torch.compile(sequence_balance_loss, dynamic=False) if cfg.compile
                             else sequence_balance_loss)
        self.optimizer = build_optimizer(self.model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr, cfg.warmup_steps, cfg.stable_steps,
                                         cfg.decay_steps, cfg.final_lr)
        self.writer_ckpt = ckpt.CheckpointWriter(self.ckpt_dir, self.info.rank, self.info.distributed,
                                                 cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
        self.allow_changes = allow_changes
        self.resumed_from: Path | None = None
        if resume:
            self.resumed_from, _ = ckpt.find_resumable(self.ckpt_dir, self._load_checkpoint, self._write)
        self.flops_per_token = flops_per_token(self.args, cfg.seq_len)
        self.writer = None
        self.history: list[dict] = []
        self.stop = StopRequest(cfg.time_limit, write=self._write)
        self.stopped: str | None = None
        self.stop_now = False
        self.slowest_step = 0.0
        self.save_seconds = 0.0

    def _write(self, line: str) -> None:
        if self.info.is_main:
            tqdm.write(line)

    # ---- checkpoints ---------------------------------------------------------------------
    def _check_settings(self, state: dict, folder: Path) -> None:
        """Refuse a resume whose settings break the run; a changed schedule only with `allow_changes` (warned)."""
        saved, now = state["config"], self.cfg.to_json()
        where = f"--resume from {folder.name}"
        if state.get("model_args") is not None and state["model_args"] != self.args.to_json():
            changed = sorted(k for k, v in self.args.to_json().items() if state["model_args"].get(k) != v)
            raise ValueError(f"{where}: the model differs from the checkpoint's ({', '.join(changed)})")
        fixed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in FIXED_FIELDS if saved.get(k) != now[k]]
        if fixed:
            raise ValueError(f"{where}: {', '.join(fixed)} changed; the run cannot continue with them")
        old_batch = saved["batch_size"] * state["world_size"]
        new_batch = self.cfg.batch_size * self.info.world_size
        if old_batch * saved["grad_accum"] != new_batch * self.cfg.grad_accum or old_batch != new_batch:
            raise ValueError(
                f"{where}: the global batch changed ({state['world_size']} rank(s) x batch {saved['batch_size']} x "
                f"accum {saved['grad_accum']} -> {self.info.world_size} x {self.cfg.batch_size} x "
                f"{self.cfg.grad_accum}); keep {old_batch} sequences per micro-batch over all ranks, e.g. "
                f"--batch-size {old_batch // self.info.world_size if old_batch % self.info.world_size == 0 else '?'}"
                f" --grad-accum {saved['grad_accum']}")
        schedule = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in SCHEDULE_FIELDS if saved.get(k) != now[k]]
        if schedule and not self.allow_changes:
            raise ValueError(f"{where}: the schedule changed ({', '.join(schedule)}); pass --allow-changed-settings "
                             "to continue with the new values, or give the run's own")
        if schedule:
            self._write(f"warning: resuming with a changed schedule: {', '.join(schedule)}")

    def _load_checkpoint(self, folder: Path) -> dict:
        """Read one checkpoint into the model, optimizer, schedule, loader, balancer and RNG (every rank)."""
        state = ckpt.read_train_state(folder)
        self._check_settings(state, folder)
        ckpt.load(folder, self.model, self.optimizer)
        step = int(state["step"])
        # the schedule is a function of the step: the group hyper-parameters come from this run's recipe
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group.update(lr=base * fn(step), initial_lr=base, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps)
            if group["weight_decay"]:
                group["weight_decay"] = self.cfg.weight_decay
        self.scheduler.last_epoch = step
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.step = step
        self.loader.load_state_dict(state["loader"])
        self.balancer.load_state_dict(state["balancer"])
        rngs = state["rng"]  # one per rank of the run that wrote it; a new world size takes rank 0's
        _set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        if self.info.is_main:
            was = f"{state['world_size']} rank(s), {state.get('mode', '?')}"
            now = f"{self.info.world_size} rank(s), {self.mode}"
            tqdm.write(f"resuming from step {step} (checkpoint {folder})"
                       + (f": written by {was}, resharded for {now}" if was != now else ""))
            self._truncate_metrics(step)
        return state

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl rows past `step` (steps the resumed run does again), keeping one row per step."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a row cut short by a kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_NNNNNNN` (every rank; see `dsv3.train.checkpoint`)."""
        start = time.perf_counter()
        rngs = [None] * self.info.world_size
        if self.info.distributed:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        state = {"step": self.step, "world_size": self.info.world_size, "mode": self.mode,
                 "config": self.cfg.to_json(), "model_args": self.args.to_json(),
                 "loader": self.loader.state_dict(), "balancer": self.balancer.state_dict(), "rng": rngs}
        path = self.writer_ckpt.save(self.step, self.model, self.optimizer, state if self.info.is_main else None,
                                     lambda folder: self._write_model_folder(folder, "float32"))
        self.save_seconds = time.perf_counter() - start
        return path

    def _last_checkpoint(self) -> Path | None:
        found = ckpt.candidates(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        return found[0] if found else None

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

    def _write_model_folder(self, path: Path, dtype: str) -> None:
        """The HF folder of the current weights in `dtype`, with the data's tokenizer files (rank 0 writes; every
        rank calls it)."""
        from dsv3.checkpoint import save_model
        model = self.full_state_model(dtype)
        if not self.info.is_main:
            return
        save_model(model, path, tokenizer=False)
        given = Path(self.data_meta.get("tokenizer", ""))  # relative to the shard folder (older: to cwd)
        tok_dir = given if given.is_absolute() else Path(self.data_dir) / given
        if not (tok_dir / "tokenizer.json").is_file():
            tok_dir = given
        if not (tok_dir / "tokenizer.json").is_file():
            if not getattr(self, "_warned_tokenizer", False):
                tqdm.write(f"note: tokenizer {tok_dir} (from {self.data_dir}/meta.json) not found from "
                           f"{Path.cwd()}; copy tokenizer.json into {path} yourself")
                self._warned_tokenizer = True
            return
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, path / name)

    def export(self) -> Path:
        """Final HF-format folder `out/model` in `export_dtype`, with the data's tokenizer files."""
        path = self.out / "model"
        self._write_model_folder(path, self.cfg.export_dtype)
        if self.info.distributed:
            dist.barrier()
        return path

    # ---- one step ------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16":
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
        # each rank's stop request rides on the metrics' all-reduce, so every rank stops after the same step
        stop = torch.tensor([float(self.stop.requested(self.slowest_step, self.save_seconds))], device=self.device)
        values = all_reduce_mean(torch.cat([sums / cfg.grad_accum, grad_norm.detach().float().view(1), stop]),
                                 self.info)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.observe()
        loss, ce, mtp, balance, gnorm, stop_votes = values.tolist()
        self.stop_now = stop_votes > 0
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            latest = self._last_checkpoint()
            kept = f"last good checkpoint: {latest}" if latest else "no checkpoint was written yet"
            raise RuntimeError(f"loss is {loss} (grad norm {gnorm}) at step {self.step + 1}; stopping ({kept})")
        bias_rate = self.balancer.current_rate()
        load = self.balancer.step(self.tokens_per_step)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.slowest_step = max(self.slowest_step, seconds)
        tokens_per_s = self.tokens_per_step / seconds
        record = {"step": self.step, "loss": loss, "ce": ce, "mtp": mtp, "balance": balance, "grad_norm": gnorm,
                  "lr": lr, "mtp_weight": mtp_weight, "bias_rate": bias_rate,
                  "tokens": self.step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * self.flops_per_token / (self.cfg.peak_tflops * 1e12 * self.info.world_size)
                  if self.device.type == "cuda" else None}
        if load is not None:
            record["load_max"], record["load_min"] = load.worst_max, load.worst_min
            record["load_max_per_layer"] = [round(v, 4) for v in load.max_ratio.tolist()]
            record["load_min_per_layer"] = [round(v, 4) for v in load.min_ratio.tolist()]
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
        """Train from the current step to `cfg.steps`, validating, logging and checkpointing; export at the end.
        A stop request (SIGTERM, SIGINT, the time limit) ends the loop after the current step with a checkpoint
        and no export; the summary's `stopped` then says why."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            (self.out / "recipe.json").write_text(json.dumps({**cfg.to_json(), "model": self.args.to_json()},
                                                             indent=2) + "\n")
        self._open_writer()
        main = self.info.is_main
        if main:
            precision = "fp8" if cfg.fp8 else self.precision + (f" (auto on {self.device.type})"
                                                                 if cfg.precision == "auto" else "")
            tqdm.write(f"dsv3 train: {self.n_params / 1e6:.1f}M parameters, {self.tokens_per_step:,} tokens/step, "
                       f"{cfg.steps} steps, device {self.device}, world {self.info.world_size} ({self.mode}), "
                       f"{precision}{', compiled' if cfg.compile else ''}"
                       + (f", time limit {self.stop.limit:g} s" if self.stop.limit else ""))
            if self.fp8_plan is not None:
                tqdm.write("\n".join(self.fp8_plan.describe()))
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not main, dynamic_ncols=True)
        last: dict = {}
        val_loss = None
        self.stop.install()
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                self.writer_ckpt.finish()  # an async checkpoint's write had this step to run alongside
                done = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                    val_loss = self.evaluate()
                    record["val_loss"] = val_loss
                self._log(record)
                self.history.append(record)
                last = record
                bar.update(1)
                bar.set_postfix(ce=f"{record['ce']:.3f}", mtp=f"{record['mtp']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if main and (self.step % cfg.log_every == 0 or done or self.step == 1 or self.stop_now):
                    tqdm.write(self._line(record))
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or done or self.stop_now:
                    self.save_checkpoint()
                if self.stop_now and not done:
                    self.stopped = self.stop.reason
                    break
            self.writer_ckpt.finish()
        finally:
            self.stop.uninstall()
            bar.close()
        if self.stopped:
            if self.writer is not None:
                self.writer.close()
            self._write(f"stopped at step {self.step} of {cfg.steps} ({self.stopped}): saved "
                        f"{self.ckpt_dir / ckpt.checkpoint_name(self.step)}; continue with --resume")
            return {"step": self.step, "last": last, "val_loss": val_loss, "model": None, "history": self.history,
                    "stopped": self.stopped}
        path = self.export()
        if self.writer is not None:
            self.writer.close()
        if main:
            tqdm.write(f"exported {path}" + (f" (val loss {val_loss:.4f})" if val_loss is not None else ""))
        return {"step": self.step, "last": last, "val_loss": val_loss, "model": str(path), "history": self.history,
                "stopped": None}

    @staticmethod
    def _line(r: dict) -> str:
        line = (f"step {r['step']:>6} | ce {r['ce']:.4f} | mtp {r['mtp']:.4f} | total {r['loss']:.4f} "
                f"(λ {r['mtp_weight']:g}) | bal {r['balance']:.2e} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | "
                f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            line += f" | mfu {100 * r['mfu']:.1f}%"
        if "load_max" in r:
            line += f" | load max/mean {r['load_max']:.2f} min/mean {r['load_min']:.2f}"
        if r.get("val_loss") is not None:
            line += f" | val {r['val_loss']:.4f}"
        return line


def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
          allow_changes: bool = False) -> dict:
    """Build a `Trainer` and run it to `cfg.steps` (or to a stop request); returns a summary (last metrics, val
    loss, export path, `stopped`). `allow_changes`: resume with a changed schedule (warned)."""
    return Trainer(cfg, data_dir, out_dir, resume, allow_changes).fit()
