"""Checkpoints and resume as a torchtitan user expects: a run killed under 2 gloo ranks (FSDP2) resumes on 1 and
on 4 ranks (expert parallel) with the losses of the uninterrupted run; SIGTERM and a time limit save and exit 0;
a damaged latest checkpoint falls back to the previous one with a warning naming the file; a changed schedule is
refused (or warned with --allow-changed-settings); metrics.jsonl keeps one row per step; every checkpoint carries
the tokenizer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dsv3
from dsv3.cli import main
from dsv3.train.trainer import Trainer, train
from test_train_ddp import _free_port
from test_train_shared import exit_worker, make_shards, tiny_config

STEPS = 4
GLOBAL_BATCH = 4  # sequences per step over all ranks: 1 x 4, 2 x 2, 4 x 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("resume_data"), repeat=3)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _config(world: int, **overrides):
    return tiny_config(steps=STEPS, batch_size=GLOBAL_BATCH // world, ckpt_every=2, **overrides)


def _kill_after(step: int):
    """A `Trainer.train_step` that dies (KeyboardInterrupt, as a kill would: nothing saved) once `step` is done."""
    real = Trainer.train_step

    def killed(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)
    return real, killed


def _worker(rank: int, world: int, port: int, data: str, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if job == "killed":  # FSDP2 on 2 ranks, killed after step 3 (the last checkpoint is step 2)
            real, killed = _kill_after(3)
            Trainer.train_step = killed
            try:
                train(_config(world, data_parallel="fsdp"), data, out)
            except KeyboardInterrupt:
                pass
            finally:
                Trainer.train_step = real
        else:  # resume with expert parallel on `world` ranks
            train(_config(world, expert_parallel=True), data, out, resume=True)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    exit_worker()


def test_killed_under_two_ranks_resumes_on_one_and_on_four(data, tmp_path):
    straight = [r["loss"] for r in train(_config(1), data, tmp_path / "straight")["history"]]
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "two"), "killed"), nprocs=2, join=True)
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert [r["step"] for r in _rows(tmp_path / "two")] == [1, 2, 3]
    shutil.copytree(tmp_path / "two", tmp_path / "four")

    one = train(_config(1), data, tmp_path / "two", resume=True)  # one process, plain tensors
    mp.spawn(_worker, args=(4, _free_port(), str(data), str(tmp_path / "four"), "resume"), nprocs=4, join=True)
    for run in ("two", "four"):
        rows = _rows(tmp_path / run)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), run  # step 3 once: the re-run replaced it
        losses = [r["loss"] for r in rows]
        print(run, losses, straight)
        assert max(abs(a - b) for a, b in zip(losses, straight)) < 1e-4, run
    assert [r["loss"] for r in one["history"]] == pytest.approx(straight[2:], abs=1e-4)
    ckpt = f"checkpoints/step_{STEPS:07d}/model"
    a = dsv3.load_model(tmp_path / "straight" / ckpt, dtype=torch.float32).state_dict()
    for run in ("two", "four"):
        b = dsv3.load_model(tmp_path / run / ckpt, dtype=torch.float32).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, run


def test_sigterm_finishes_the_step_saves_and_the_run_resumes(data, tmp_path, capsys):
    cfg = tiny_config(steps=6, ckpt_every=0)
    straight = [r["loss"] for r in train(cfg, data, tmp_path / "straight")["history"]]
    real = Trainer.train_step

    def signalled(self):
        if self.step == 2:  # SIGTERM arrives in the middle of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    Trainer.train_step = signalled
    try:
        result = train(cfg, data, tmp_path / "run")
    finally:
        Trainer.train_step = real
    assert result["stopped"] == "SIGTERM" and result["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    out = capsys.readouterr()
    assert "got SIGTERM: finishing this step" in out.out + out.err
    assert "stopped at step 3 of 6 (SIGTERM)" in out.out + out.err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (tmp_path / "run" / "model").exists()  # no export for a run that did not finish
    resumed = train(cfg, data, tmp_path / "run", resume=True)
    assert "resuming from step 3 (checkpoint" in capsys.readouterr().out
    assert [r["loss"] for r in resumed["history"]] == straight[3:]  # same process: bit for bit
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, 7))

    def interrupted(self):  # Ctrl-C (SIGINT) in step 2: the same, once
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    Trainer.train_step = interrupted
    try:
        result = train(cfg, data, tmp_path / "ctrl_c")
    finally:
        Trainer.train_step = real
    assert result["stopped"] == "SIGINT" and result["step"] == 2
    assert (tmp_path / "ctrl_c" / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_exits_0_on_sigterm_and_on_the_time_limit(data, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_config(steps=100000, ckpt_every=0, log_every=1).to_json()))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "train", "--config", str(recipe), "--data", str(data),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and _rows(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = len(_rows(out))
    assert f"stopped at step {step} of 100000 (SIGTERM)" in stdout + stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
    # the time limit: the first step already leaves no room for a second one and a save
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "timed"),
                 "--time-limit", "0.001"]) == 0
    assert (tmp_path / "timed" / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--time-limit", "soon"]) == 1


def test_damaged_latest_checkpoint_falls_back_with_a_warning(data, tmp_path, capsys):
    cfg = tiny_config(steps=6, ckpt_every=2, keep_checkpoints=3)
    straight = [r["loss"] for r in train(cfg, data, tmp_path / "straight")["history"]]
    real, killed = _kill_after(5)
    Trainer.train_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run")
    finally:
        Trainer.train_step = real
    ckpts = tmp_path / "run" / "checkpoints"
    bad = ckpts / "step_0000004" / "model" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    resumed = train(cfg, data, tmp_path / "run", resume=True)
    out = capsys.readouterr().out
    assert f"warning: checkpoint step_0000004 is damaged: {bad} has 1000 bytes" in out
    assert "resuming from step 2 (checkpoint" in out
    assert [r["loss"] for r in resumed["history"]] == straight[2:]
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, 7))

    # train_state.pt of the same size but other bytes in every checkpoint: nothing to fall back to, one line
    for step in (2, 4, 6):
        state = ckpts / f"step_{step:07d}" / "train_state.pt"
        state.write_bytes(b"\0" * state.stat().st_size)
    capsys.readouterr()
    assert main(["train", "--config", str(_recipe(tmp_path, cfg)), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dsv3 train: error: --resume: no intact checkpoint in {ckpts} (newest: "
                              f"{ckpts / 'step_0000006' / 'train_state.pt'}: unreadable")


def _recipe(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(cfg.to_json()))
    return path


def test_changed_settings_on_resume(data, tmp_path, capsys):
    cfg = tiny_config(steps=3, ckpt_every=3)
    train(cfg, data, tmp_path / "run")
    recipe = _recipe(tmp_path, cfg)
    base = ["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"), "--resume"]
    capsys.readouterr()
    assert main(base + ["--steps", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("dsv3 train: error: --resume from step_0000003: the schedule changed (steps 3 -> 5); pass "
                       "--allow-changed-settings to continue with the new values, or give the run's own")
    assert main(base + ["--seq-len", "16"]) == 1
    assert "seq_len 32 -> 16 changed" in capsys.readouterr().err
    assert main(base + ["--batch-size", "2"]) == 1
    assert "the global batch changed (1 rank(s) x batch 4 x accum 1 -> 1 x 2 x 1)" in capsys.readouterr().err
    assert main(base + ["--steps", "5", "--allow-changed-settings"]) == 0
    out = capsys.readouterr().out
    assert "warning: resuming with a changed schedule: steps 3 -> 5" in out and "resuming from step 3" in out
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5]
    # a change the run does not depend on needs no permission
    assert main(base + ["--steps", "5", "--eval-every", "1", "--log-every", "2"]) == 0


def test_every_checkpoint_carries_the_tokenizer_and_loads(data, tmp_path):
    from dsv3.tokenizer import load_tokenizer
    train(tiny_config(steps=2, ckpt_every=1, keep_checkpoints=5), data, tmp_path / "run")
    for step in (1, 2):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step:07d}" / "model"
        assert (folder / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
        tok = load_tokenizer(folder)
        ids = tok.encode("the text", add_special_tokens=False)
        assert tok.decode(ids) == "the text"
        model = dsv3.load_model(folder, dtype=torch.float32)
        assert model(torch.tensor([ids])).isfinite().all()


def test_async_checkpoint_resumes_bit_for_bit(data, tmp_path):
    cfg = tiny_config(steps=4, ckpt_every=2, async_checkpoint=True)
    straight = [r["loss"] for r in train(cfg, data, tmp_path / "straight")["history"]]
    real, killed = _kill_after(3)
    Trainer.train_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run")
    finally:
        Trainer.train_step = real
    resumed = train(cfg, data, tmp_path / "run", resume=True)
    assert [r["loss"] for r in resumed["history"]] == straight[2:]
