"""Data parallel on CPU: 2 gloo ranks of batch B (torch.multiprocessing, the env contract of torchrun) give the
same losses, weights and gate biases as 1 process of batch 2B; gradient accumulation matches too."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp

import dsv3
from dsv3.train.trainer import train
from test_train_shared import dcp_keys, exit_worker, make_shards, tiny_config, train_killed_then_resumed

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, data_parallel: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(tiny_config(steps=STEPS, batch_size=2, data_parallel=data_parallel), data, out)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    exit_worker()


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_process_with_double_batch(tmp_path):
    """DDP and FSDP2 (the default where it applies) under the trainer, with checkpoints and the export."""
    data = make_shards(tmp_path / "data", repeat=3)
    single = train(tiny_config(steps=STEPS, batch_size=4), data, tmp_path / "single")
    accum = train(tiny_config(steps=STEPS, batch_size=2, grad_accum=2), data, tmp_path / "accum")
    for mode in ("ddp", "fsdp"):
        mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / mode), mode), nprocs=2, join=True)

    base = [r["loss"] for r in single["history"]]
    for name in ("ddp", "fsdp", "accum"):
        other = _losses(tmp_path / name)
        print(name, "losses", other, "vs", base)
        assert len(other) == STEPS
        assert max(abs(a - b) for a, b in zip(base, other)) < 1e-4, name
        ckpt = f"checkpoints/step_{STEPS:07d}/model"  # float32 master weights
        a = dsv3.load_model(tmp_path / "single" / ckpt, dtype=torch.float32).state_dict()
        b = dsv3.load_model(tmp_path / name / ckpt, dtype=torch.float32).state_dict()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, f"{name}: max weight difference {worst}"
        biases = [k for k in a if k.endswith("e_score_correction_bias")]
        assert all(torch.equal(a[k], b[k]) for k in biases), name  # same counts -> same ±γ steps


def _killed_then_resumed_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """FSDP2 with activation checkpointing: a run killed after step 3 (the last checkpoint is step 2), then
    resumed from that checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train_killed_then_resumed(tiny_config(steps=STEPS, batch_size=2, ckpt_every=2, data_parallel="fsdp",
                                              activation_checkpointing=True),
                                  data, out, kill_after=3)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    exit_worker()


def test_fsdp_checkpoint_resumes_to_the_same_run(tmp_path):
    data = make_shards(tmp_path / "data", repeat=3)
    single = train(tiny_config(steps=STEPS, batch_size=4, ckpt_every=2), data, tmp_path / "single")
    mp.spawn(_killed_then_resumed_worker, args=(2, _free_port(), str(data), str(tmp_path / "fsdp")), nprocs=2,
             join=True)
    names = dcp_keys(tmp_path / "fsdp" / "checkpoints" / "step_0000002")  # the DCP state, keyed by plain names
    assert any(k.startswith("optimizer.state.") and k.endswith(".exp_avg") for k in names)
    assert not any("_checkpoint_wrapped_module" in k for k in names)
    losses = _losses(tmp_path / "fsdp")  # steps 1-2 of the killed run, then 3-4 of the resumed one (its step 3 dropped)
    base = [r["loss"] for r in single["history"]]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, base)) < 1e-4, (losses, base)
    ckpt = f"checkpoints/step_{STEPS:07d}/model"
    a = dsv3.load_model(tmp_path / "single" / ckpt, dtype=torch.float32).state_dict()
    b = dsv3.load_model(tmp_path / "fsdp" / ckpt, dtype=torch.float32).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
