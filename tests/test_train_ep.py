"""Expert parallel on CPU: 2 gloo ranks, each owning half of every MoE layer's routed experts (tokens reach them
by all-to-all) and training on half of the batch, give the same losses, weights and gate biases as 1 process on
the whole batch; a run killed and resumed from its (gathered) checkpoint ends the same (that one with activation
checkpointing)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import dsv3
from dsv3.train.expert_parallel import RemoteExpert, shard_experts
from dsv3.train.recipe import TrainConfig
from dsv3.train.trainer import train
from test_train_ddp import _free_port, _losses
from test_train_shared import dcp_keys, exit_worker, make_shards, tiny_config, tiny_model, train_killed_then_resumed

STEPS = 4


def _worker(rank: int, world: int, port: int, data: str, out: str, kill_after: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # the resumed variant also recomputes activations: names keyed in its checkpoints must stay the plain ones
    cfg = tiny_config(steps=STEPS, batch_size=2, ckpt_every=2, expert_parallel=True,
                      activation_checkpointing=kill_after is not None)
    try:
        if kill_after is None:
            train(cfg, data, out)
        else:
            train_killed_then_resumed(cfg, data, out, kill_after)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    exit_worker()


def test_expert_parallel_config_checks():
    with pytest.raises(ValueError, match="expert_parallel runs with DDP"):
        TrainConfig(expert_parallel=True, data_parallel="fsdp")
    with pytest.raises(ValueError, match="without compile"):
        TrainConfig(expert_parallel=True, compile=True)
    model = tiny_model()
    assert shard_experts(model, 0, 1) is None  # one process: nothing changes
    assert not any(isinstance(e, RemoteExpert) for e in model.modules())
    assert "experts_impl=LocalExperts()" in repr(model)  # the MoE layers keep their local experts


@pytest.mark.parametrize("kill_after", [None, 3])
def test_two_expert_parallel_ranks_equal_one_process(tmp_path, kill_after):
    data = make_shards(tmp_path / "data", repeat=3)
    single = train(tiny_config(steps=STEPS, batch_size=4, ckpt_every=2), data, tmp_path / "single")
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ep"), kill_after), nprocs=2, join=True)

    base = [r["loss"] for r in single["history"]]
    losses = _losses(tmp_path / "ep")
    expected = base  # killed: resumed from the step-2 checkpoint, the killed run's step 3 row replaced
    print("ep", losses, "single", base)
    assert len(losses) == len(expected)
    assert max(abs(a - b) for a, b in zip(losses, expected)) < 1e-4
    ckpt = f"checkpoints/step_{STEPS:07d}/model"
    a = dsv3.load_model(tmp_path / "single" / ckpt, dtype=torch.float32).state_dict()
    b = dsv3.load_model(tmp_path / "ep" / ckpt, dtype=torch.float32).state_dict()  # all experts gathered
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    largest = sorted(((a[k] - b[k]).abs().max().item(), k) for k in a)[-3:]
    assert worst < 1e-5, f"max weight difference {worst}: {largest}"
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(a[k], b[k]) for k in biases)
    names = dcp_keys(tmp_path / "ep" / "checkpoints" / f"step_{STEPS:07d}")  # the DCP state every rank wrote into
    assert not any("_checkpoint_wrapped_module" in n for n in names)
    experts = [n for n in names if n.startswith("optimizer.state.") and ".experts." in n and n.endswith(".exp_avg")]
    assert len(experts) == sum(".experts." in k and k.endswith("weight") for k in a)  # every expert's AdamW state
