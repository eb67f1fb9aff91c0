"""The trainer end to end on a tiny model and real text: loss falls, the export loads, TensorBoard gets the
scalars, a killed run resumes bit for bit, NaN stops the run, and the `dsv3 train` CLI."""

import json

import pytest
import torch

import dsv3
from dsv3.train import trainer as trainer_mod
from dsv3.cli import main
from dsv3.train.losses import next_token_loss
from dsv3.train.recipe import TrainConfig
from dsv3.train.trainer import Trainer, train
from test_train_shared import make_shards, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("train_data"), repeat=4)


def test_loss_falls_and_export_loads(data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(steps=30, eval_every=15, eval_batches=2), data, out)
    hist = result["history"]
    first, last = hist[0], sum(r["ce"] for r in hist[-5:]) / 5
    last_mtp = sum(r["mtp"] for r in hist[-5:]) / 5
    print(f"ce {first['ce']:.3f} -> {last:.3f}, mtp {first['mtp']:.3f} -> {last_mtp:.3f}, val {result['val_loss']:.3f}")
    assert last < first["ce"] - 1.0 and last_mtp < first["mtp"] - 0.8
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 and "load_max" in r for r in hist)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31)) and "val_loss" in lines[14]
    # TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 30 and len(events.Scalars("val/loss")) == 2
    assert "load_max_over_mean/layer_0" in events.Tags()["scalars"]
    # the final export is an HF folder in bf16 that dsv3 loads; its validation loss matches the trainer's
    model = dsv3.load_model(out / "model", dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and (out / "model" / "tokenizer.json").is_file()
    from dsv3.train.data import PackedLoader
    loader = PackedLoader(data, "val", 32, 4, shuffle=False)
    with torch.no_grad():
        val = sum(next_token_loss(model(x, absorb=False), y).item() for x, y in (next(loader) for _ in range(2))) / 2
    assert abs(val - result["val_loss"]) < 0.05


def _weights(path):
    model = dsv3.load_model(path, dtype=torch.float32)
    return model.state_dict()


def test_resume_is_bit_for_bit(data, tmp_path, monkeypatch):
    cfg = tiny_config(steps=6, ckpt_every=3, grad_accum=2, batch_size=2, precision="bf16")
    straight = train(cfg, data, tmp_path / "straight")

    real_step = Trainer.train_step

    def killed_after_4(self):
        if self.step == 4:  # step 4 finished but never checkpointed: the kill loses it
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", killed_after_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, data, tmp_path / "resumed")
    resumed = train(cfg, data, tmp_path / "resumed", resume=True)

    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][3:]]
    a = _weights(tmp_path / "straight" / "checkpoints" / "step_0000006" / "model")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "step_0000006" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.endswith("e_score_correction_bias") and a[k].abs().max() > 0 for k in a)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, data, tmp_path / "empty", resume=True)


def test_nan_loss_stops_with_a_clear_message(data, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(logits, targets):  # the main CE of step 3 (the MTP depths call it too, on T - k positions)
        calls["n"] += logits.shape[1] == tiny_config().seq_len
        loss = next_token_loss(logits, targets)
        return loss * float("nan") if calls["n"] == 3 and logits.shape[1] == tiny_config().seq_len else loss

    monkeypatch.setattr(trainer_mod, "next_token_loss", poisoned)
    with pytest.raises(RuntimeError, match=r"loss is nan \(grad norm nan\) at step 3.*last good checkpoint.*step_0000002"):
        train(tiny_config(steps=5, ckpt_every=2), data, tmp_path / "run")


def test_cli_trains_and_reports_errors(data, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({k: v for k, v in tiny_config().to_json().items()}))
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "3", "--lr", "1e-3", "--no-fp8"]) == 0
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["steps"] == 3 and saved["lr"] == 1e-3 and saved["seq_len"] == 32
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--warmup-steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "dsv3 train: error: warmup_steps must be >= 1, got 0"


def test_builtin_recipes_are_valid():
    for name in ("small", "tiny"):
        cfg = TrainConfig.from_json(name)
        args = trainer_mod.model_args(cfg, {"vocab_size": 8192, "bos_id": 0, "eos_id": 1})
        assert args.max_seq_len >= cfg.seq_len
    from dsv3.model.counts import count_parameters
    small = trainer_mod.model_args(TrainConfig.from_json("small"), {"vocab_size": 8192})
    counts = count_parameters(small)
    stored = counts.main + counts.mtp_with_copies  # what save_model writes, MTP copies included
    assert stored * 2 < 60e6, f"small recipe writes {stored * 2 / 1e6:.1f} MB in bf16"


def test_activation_checkpointing_gives_the_same_run_and_checkpoint(data, tmp_path):
    """`--activation-checkpointing`: the same losses and gradient norms, and a checkpoint with the same keys
    and weights as the run without it."""
    from safetensors import safe_open
    plain = train(tiny_config(steps=3, ckpt_every=3), data, tmp_path / "plain")["history"]
    recomputed = train(tiny_config(steps=3, ckpt_every=3, activation_checkpointing=True), data, tmp_path / "ac")["history"]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in recomputed] == pytest.approx([r[key] for r in plain], rel=1e-6), key
    files = [tmp_path / run / "checkpoints" / "step_0000003" / "model" / "model.safetensors" for run in ("plain", "ac")]
    keys = [set(safe_open(str(f), "pt").keys()) for f in files]
    assert keys[0] == keys[1] and not any("_checkpoint_wrapped_module" in k for k in keys[1])
    a, b = (_weights(f.parent) for f in files)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_precision_auto_is_fp32_on_a_cpu_and_said_at_start(data, tmp_path, capsys):
    """The default precision: fp32 on a CPU (bf16 autocast is several times slower there), named on the start line;
    the run equals an explicit fp32 run step for step."""
    assert TrainConfig().precision == "auto"
    for name in ("tiny", "small", "default_model"):
        assert TrainConfig.from_json(name).precision == "auto", name
    auto = train(tiny_config(steps=2, precision="auto"), data, tmp_path / "auto")["history"]
    assert "fp32 (auto on cpu)" in capsys.readouterr().out
    fp32 = train(tiny_config(steps=2, precision="fp32"), data, tmp_path / "fp32")["history"]
    assert [r["loss"] for r in auto] == [r["loss"] for r in fp32]
