"""FSDP2 on CPU: 2 gloo ranks, each holding half of every parameter and of AdamW's state and training on half of
the batch, give the same losses and weights as 1 process on the whole batch; a checkpoint gathered to full
tensors mid-run and scattered into a fresh sharded model resumes to the same end."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dsv3.train import fsdp
from dsv3.train.losses import mtp_loss, next_token_loss
from test_train_shared import exit_worker, tiny_model

STEPS, BATCH, SEQ, VOCAB = 4, 4, 16, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    """The same random batch every step: the loss must fall as the model memorises it."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)] * STEPS


def _step(model, optimizer, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, mtp_logits = model(inputs, return_mtp=True, absorb=False)  # [B, T, V], MTP depths
    loss = next_token_loss(logits, targets) + 0.3 * mtp_loss(mtp_logits, targets, 1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _worker(rank: int, world: int, port: int, out: str, resume_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = fsdp.shard_model(tiny_model(seed=0).train(), world, torch.device("cpu"))
        optimizer = _optimizer(model)
        losses = []
        for i, tokens in enumerate(_batches()):
            if i == resume_at:  # gather, then scatter into a fresh sharded model and optimizer
                state, opt_state = fsdp.full_model_state(model), fsdp.full_optimizer_state(model, optimizer)
                model = fsdp.shard_model(tiny_model(seed=1).train(), world, torch.device("cpu"))
                optimizer = _optimizer(model)
                fsdp.load_full_model_state(model, state)
                fsdp.load_full_optimizer_state(model, optimizer, opt_state)
            half = tokens.chunk(world)[rank]
            loss = _step(model, optimizer, half)
            torch.distributed.all_reduce(loss)
            losses.append(loss.item() / world)
        state = fsdp.full_model_state(model)
        if rank == 0:
            torch.save({"losses": losses, "state": state}, out)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    exit_worker()


def test_fsdp_needs_the_grouped_moe_path():
    model = tiny_model()
    assert fsdp.fsdp_applies(model)
    moe = next(block.mlp for block in model.blocks() if hasattr(block.mlp, "experts"))
    moe.experts[0].gate_proj = torch.nn.Identity()  # not a plain Linear: the reference loop would run
    assert not fsdp.fsdp_applies(model)
    with pytest.raises(ValueError, match="grouped MoE path"):
        fsdp.shard_model(model, 1, torch.device("cpu"))


@pytest.mark.parametrize("resume_at", [None, 2])
def test_two_fsdp_ranks_equal_one_process(tmp_path, resume_at):
    model = tiny_model(seed=0).train()
    optimizer = _optimizer(model)
    base = [_step(model, optimizer, tokens).item() for tokens in _batches()]
    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), resume_at), nprocs=2, join=True)
    got = torch.load(out)
    print("fsdp", got["losses"], "single", base)
    assert len(got["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(got["losses"], base)) < 1e-5
    assert base[-1] < base[0]  # and it trains
    single = model.state_dict()
    assert set(got["state"]) == set(single)
    worst = max((got["state"][k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-5, f"max weight difference {worst}"
