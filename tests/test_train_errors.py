"""Every broken input of `dsv3 train` and `dsv3 data tokenize` is one line on stderr that names its file, exit 1:
a recipe field of the wrong type, invalid JSON in a recipe, a model spec or meta.json, an empty, cut-short or
missing token shard, a damaged train_state.pt, and empty tokenize input."""

import json
import shutil

import pytest

from dsv3.cli import main
from test_train_shared import make_shards, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("errors_data"))


def _error(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err, err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.json"
    path.write_text(text)
    return path


def _train(recipe, data, out):
    return ["train", "--config", str(recipe), "--data", str(data), "--out", str(out)]


def test_recipe_errors_name_the_file(data, tmp_path, capsys):
    good = tiny_config(steps=1).to_json()
    recipe = _recipe(tmp_path, json.dumps({**good, "lr": "fast"}))
    assert _error(capsys, _train(recipe, data, tmp_path / "a")) == (
        f"dsv3 train: error: {recipe}: field 'lr' must be a number, got 'fast'")
    recipe = _recipe(tmp_path, json.dumps({**good, "steps": 2.5}))
    assert _error(capsys, _train(recipe, data, tmp_path / "a")) == (
        f"dsv3 train: error: {recipe}: field 'steps' must be an integer, got 2.5")
    recipe = _recipe(tmp_path, '{"steps": 3,\n "lr": }')
    assert _error(capsys, _train(recipe, data, tmp_path / "a")) == (
        f"dsv3 train: error: {recipe}: invalid JSON at line 2 column 8: Expecting value")
    spec = tmp_path / "model.json"
    spec.write_text('{"dim": 48,')
    recipe = _recipe(tmp_path, json.dumps({**good, "model": str(spec)}))
    assert _error(capsys, _train(recipe, data, tmp_path / "a")).startswith(
        f"dsv3 train: error: {spec}: invalid JSON at line 1")


def test_data_errors_name_the_file(data, tmp_path, capsys):
    recipe = _recipe(tmp_path, json.dumps(tiny_config(steps=1).to_json()))
    broken = tmp_path / "meta_broken"
    shutil.copytree(data, broken)
    (broken / "meta.json").write_text('{"dtype": "uint16", "vocab_size": 320, ')
    assert _error(capsys, _train(recipe, broken, tmp_path / "a")).startswith(
        f"dsv3 train: error: {broken / 'meta.json'}: invalid JSON at line 1 column 40")

    for name, cut in (("empty", 0), ("truncated", 101)):
        folder = tmp_path / name
        shutil.copytree(data, folder)
        shard = folder / "train_000.bin"
        size = shard.stat().st_size
        shard.write_bytes(shard.read_bytes()[:cut])
        meta = json.loads((folder / "meta.json").read_text())
        tokens = meta["splits"]["train"]["shards"][0]["tokens"]
        assert _error(capsys, _train(recipe, folder, tmp_path / name / "run")) == (
            f"dsv3 train: error: {shard}: {cut} bytes, but meta.json lists {tokens} uint16 tokens ({size} bytes); "
            "the shard is damaged: run `dsv3 data tokenize` again")
        shard.unlink()
        assert _error(capsys, _train(recipe, folder, tmp_path / name / "run")) == (
            f"dsv3 train: error: {shard}: shard listed in {folder / 'meta.json'} is missing")


def test_damaged_train_state_is_named(data, tmp_path, capsys):
    cfg = tiny_config(steps=1, ckpt_every=1)
    recipe = _recipe(tmp_path, json.dumps(cfg.to_json()))
    assert main(_train(recipe, data, tmp_path / "run")) == 0
    state = tmp_path / "run" / "checkpoints" / "step_0000001" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    line = _error(capsys, _train(recipe, data, tmp_path / "run") + ["--resume"])
    assert line.startswith(f"dsv3 train: error: --resume: no intact checkpoint in {tmp_path / 'run' / 'checkpoints'} "
                           f"(newest: {state} has 200 bytes")


def test_tokenize_refuses_empty_input(data, tmp_path, capsys):
    tok = data.parent / "tok"
    for name, text in (("empty.jsonl", ""), ("blank.txt", "\n\n")):
        empty = tmp_path / name
        empty.write_text(text)
        out = tmp_path / f"shards_{name}"
        line = _error(capsys, ["data", "tokenize", "--tokenizer", str(tok), "--input", str(empty), "--output", str(out)])
        assert line == (f"dsv3 data tokenize: error: no documents in {empty}: nothing to train on (a .jsonl needs a "
                        "'text' field per line, a .txt file text)")
        assert not list(out.glob("*.bin")) and not (out / "meta.json").exists()
