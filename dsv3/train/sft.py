"""Supervised fine-tuning (SFT) of a trained checkpoint on chat conversations: the recipe that turns the
built-in base model into the built-in chat model.

Each conversation (`{"messages": [...]}` per line, as `dsv3 data chat` writes) is rendered with the
checkpoint's DeepSeek-V3 chat template and tokenized once; the loss is next-token cross-entropy on the
assistant tokens only (each answer and the end-of-sentence token that closes it), plus the MTP loss on
the same targets, so the MTP module keeps drafting for the tuned model. Everything else (BOS, system
prompt, user turns, the `<｜User｜>`/`<｜Assistant｜>` tags) is context with target -100.

The base weights stay frozen; low-rank adapters (`lora.py`, rank `lora_rank`) on every Linear but the
routed experts are trained, and the result is saved as an adapter folder (`dsv3.checkpoint.adapter`: a few
MB that name the base folder) beside `sft_metrics.jsonl` and `sft_config.json`; `dsv3 chat --model OUT`
merges it on first use. Batches are whole conversations, padded to the longest in the batch, drawn in a
seeded order each epoch. AdamW (`optim.build_optimizer`) with warm-up then cosine decay
(`optim.build_scheduler`); bf16 autocast over float32 weights on a GPU, float32 on a CPU. The routing
biases stay as trained (no bias updates: the tuning set is small and its expert load is not the
pre-training mix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dsv3.tokenizer import Tokenizer, load_tokenizer
from dsv3.train.losses import IGNORE_INDEX, mtp_losses, next_token_loss
from dsv3.train.optim import build_optimizer, build_scheduler


@dataclass
class SFTConfig:
    """The SFT recipe. `batch_size` is conversations per optimizer step."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    final_lr: float = 1e-4
    lora_rank: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.1
    max_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "warmup_steps", "max_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.final_lr <= self.lr:
            raise ValueError(f"need 0 < final_lr <= lr, got final_lr={self.final_lr}, lr={self.lr}")
        if self.mtp_weight < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("mtp_weight, grad_clip and weight_decay must be >= 0")


# ----------------------------------------------------------------------------- data

def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                        max_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is an assistant token (an answer's
    text or the end-of-sentence token closing it), the tokens the loss is taken on. Truncated to `max_len`.

    The assistant spans are found in the text: for assistant message i, the template's rendering of the
    messages before it with the generation prompt ends where the answer starts, and its rendering through
    message i ends where it stops. Tokens are mapped by their character offsets (the tags are special
    tokens, so no token crosses a span's edge)."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a conversation needs at least one assistant message")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise ValueError("the chat template does not render the conversation turn by turn")
        spans.append((len(head), len(upto)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc.offsets]
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def load_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    """The `messages` of each line of a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no chat data file {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a {{\"messages\": [...]}} object ({exc})") from None
            out.append(messages)
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def tensorize(tokenizer: Tokenizer, conversations: list[list[dict[str, Any]]], max_len: int
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) per conversation: inputs = ids[:-1], targets[t] = ids[t + 1] where that token is
    an assistant token, else -100. Conversations whose answers were cut off entirely are dropped."""
    out = []
    for messages in conversations:
        ids, mask = encode_conversation(tokenizer, messages, max_len + 1)
        targets = np.where(np.array(mask[1:], dtype=bool), np.array(ids[1:]), IGNORE_INDEX)
        if (targets != IGNORE_INDEX).any():
            out.append((np.array(ids[:-1], dtype=np.int64), targets.astype(np.int64)))
    return out


def batches(examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int,
            rng: np.random.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded `[B, T]` (inputs, targets) batches in a shuffled order (`rng`) or the given one."""
    order = rng.permutation(len(examples)) if rng is not None else np.arange(len(examples))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[k] for k in order[start:start + batch_size]]
        width = max(len(x) for x, _ in chunk)
        inputs = np.full((len(chunk), width), pad_id, dtype=np.int64)
        targets = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
        for r, (x, y) in enumerate(chunk):
            inputs[r, :len(x)], targets[r, :len(y)] = x, y
        out.append((torch.from_numpy(inputs), torch.from_numpy(targets)))
    return out


# ----------------------------------------------------------------------------- training

def sft_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token CE, mean MTP CE over depths) on the assistant targets of one batch."""
    logits, mtp_logits = model(inputs, return_mtp=True, absorb=False)
    ce = next_token_loss(logits, targets)
    per_depth = [loss for loss in mtp_losses(mtp_logits, targets) if torch.isfinite(loss)]
    mtp = torch.stack(per_depth).mean() if per_depth else torch.zeros((), device=ce.device)
    return ce, mtp


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: Any) -> float:
    """Mean assistant-token CE over `data` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in data:
        n = int((targets != IGNORE_INDEX).sum())
        with autocast():
            ce, _ = sft_losses(model, inputs.to(device), targets.to(device))
        total, count = total + float(ce) * n, count + n
    model.train()
    return total / max(count, 1)


def sft(base: str | Path, train_file: str | Path, out: str | Path, cfg: SFTConfig = SFTConfig(),
        val_file: str | Path | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Fine-tune the checkpoint in `base` on the conversations of `train_file`; write the adapter folder into
    `out`. Returns a summary (answer-token CE on `val_file` before and after, steps, seconds)."""
    from dsv3.checkpoint import load_model
    from dsv3.checkpoint.adapter import save_adapter
    from dsv3.train.lora import add_lora, lora_factors

    base, out = Path(base), Path(out)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    train = tensorize(tokenizer, load_conversations(train_file), cfg.max_len)
    val = batches(tensorize(tokenizer, load_conversations(val_file), cfg.max_len), cfg.batch_size, pad_id) \
        if val_file else []
    model = load_model(base, device=dev, dtype=torch.float32, progress=progress)
    targets = add_lora(model, cfg.lora_rank)
    model.train()
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total)
    optimizer = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr, warmup, 0, total - warmup, cfg.final_lr)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"train_conversations": len(train), "steps": total, "adapted_weights": len(targets),
                               "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                               "assistant_tokens": int(sum((y != IGNORE_INDEX).sum() for _, y in train)),
                               "val_ce_before": evaluate(model, val, dev, autocast) if val else None}
    rng = np.random.default_rng(cfg.seed)
    start, step = time.time(), 0
    with open(out / "sft_metrics.jsonl", "w") as log, tqdm(total=total, desc="sft", unit="step",
                                                          disable=not progress) as bar:
        for epoch in range(cfg.epochs):
            for inputs, targets in batches(train, cfg.batch_size, pad_id, rng):
                inputs, targets = inputs.to(dev), targets.to(dev)
                with autocast():
                    ce, mtp = sft_losses(model, inputs, targets)
                loss = ce + cfg.mtp_weight * mtp
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, "ce": float(ce.detach()), "mtp": float(mtp.detach()),
                          "grad_norm": float(grad_norm), "lr": lr}
                if not math.isfinite(record["ce"]):
                    raise RuntimeError(f"loss is {record['ce']} at SFT step {step}; stopping")
                if step == total or step % steps_per_epoch == 0:
                    if val:
                        record["val_ce"] = evaluate(model, val, dev, autocast)
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(ce=f"{record['ce']:.3f}")
                bar.update()
    summary.update({"val_ce_after": evaluate(model, val, dev, autocast) if val else None,
                    "train_ce_last": record["ce"], "seconds": round(time.time() - start, 1)})
    model.eval()
    save_adapter(lora_factors(model, model.args.n_layers), out, base, cfg.lora_rank)
    (out / "sft_config.json").write_text(json.dumps({"base": str(base), "train_file": str(train_file),
                                                     "config": dataclasses.asdict(cfg), "summary": summary},
                                                    indent=2) + "\n")
    return summary
