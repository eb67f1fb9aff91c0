"""Shared pieces of the training tests (no tests here): a tiny model spec, token shards built from real
text (the Python standard library's own source) with the data helper's tokenizer trainer and tokenizer."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import torch

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
            "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}")

TINY_MODEL = dict(
    dim=48, inter_dim=96, moe_inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=2,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
    num_nextn_predict_layers=1, rope_factor=1.0, max_seq_len=256, route_scale=2.5,
)


def real_documents(repeat: int = 1) -> list[str]:
    """Paragraph-sized documents from the docstrings of `textwrap` (real English), repeated `repeat` times."""
    source = inspect.getsource(textwrap)
    paragraphs = [p.strip() for p in source.split("\n\n") if len(p.strip()) > 200]
    return paragraphs * repeat


def make_shards(root: Path, repeat: int = 1, vocab_size: int = 320, val_fraction: float = 0.2) -> Path:
    """Train a byte-level BPE on the documents and tokenize them into train/val shards; returns the folder."""
    from dsv3.train import bpe, data
    docs = real_documents(repeat)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    bpe.train_tokenizer([corpus], vocab_size, root / "tok", TEMPLATE)
    data.tokenize_corpus(root / "tok", [corpus], root / "shards", val_fraction=val_fraction)
    return root / "shards"


def tiny_config(**overrides):
    from dsv3.train.recipe import TrainConfig
    base = dict(model=dict(TINY_MODEL), seq_len=32, batch_size=4, steps=20, lr=3e-3, final_lr=3e-4,
                warmup_steps=2, decay_frac=0.3, precision="fp32", eval_every=0, eval_batches=1,
                ckpt_every=0, log_every=1000, device="cpu", bias_update_rate=1e-3)
    base.update(overrides)
    return TrainConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    from dsv3.config import ModelArgs
    from dsv3.model import Transformer
    torch.manual_seed(seed)
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": 64, "dtype": "float32", **overrides})
    return Transformer(args, dtype=torch.float32)


def dcp_keys(checkpoint: Path) -> set[str]:
    """The keys of a training checkpoint's DCP state (`state/.metadata`)."""
    from torch.distributed.checkpoint import FileSystemReader
    return set(FileSystemReader(str(Path(checkpoint) / "state")).read_metadata().state_dict_metadata)


def exit_worker() -> None:
    """End a spawned distributed test worker that succeeded: barrier, destroy the group, then leave without
    running interpreter teardown. With FSDP2 on gloo the teardown aborts now and then ("terminate called
    without an active exception", about 1 run in 16 here) after all work is done, which would fail the test
    for nothing."""
    import os
    import sys

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_killed_then_resumed(cfg, data, out, kill_after: int) -> None:
    """Train `cfg` but stop (KeyboardInterrupt) once step `kill_after` is done, as a kill would; then resume the
    run from its latest checkpoint to the end."""
    from dsv3.train.trainer import Trainer, train
    real_step = Trainer.train_step

    def killed(self):
        if self.step == kill_after:
            raise KeyboardInterrupt
        return real_step(self)

    Trainer.train_step = killed
    try:
        train(cfg, data, out)
    except KeyboardInterrupt:
        pass
    finally:
        Trainer.train_step = real_step
    train(cfg, data, out, resume=True)
