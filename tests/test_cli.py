"""The `dsv3` command line as a whole: verbs registered, one flag vocabulary across verbs, one error policy,
`dsv3 --help` without torch, and the entry points (`python -m dsv3.cli`, the `dsv3` console script)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dsv3.cli import VERBS, build_parser, main
from dsv3.cli import flags

ROOT = Path(__file__).resolve().parents[1]
DTYPE_VERBS = ("generate", "chat", "serve", "eval")  # the verbs that load a model for inference
REQUIRED = {"generate": ["--prompt", "x"], "chat": [], "serve": [], "eval": ["--tasks", "ppl", "--text", "t.txt"]}


def _leaf_parsers(parser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in sub.choices.values():
            yield from _leaf_parsers(child)


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser([verb])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def test_info_prints_counts(capsys):
    assert main(["info", "--preset", "671B"]) == 0
    out = capsys.readouterr().out
    assert "parameters (main model)        671.026B" in out
    assert "36.7B activated" in out


def test_info_reads_a_checkpoint_through_the_model_resolver(tmp_path, capsys):
    from dsv3.config import ModelArgs

    (tmp_path / "config.json").write_text(json.dumps(ModelArgs.from_preset("tiny").to_hf_config()))
    assert main(["info", "--model", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: 3 layers (1 dense), dim 64")
    assert main(["info", "--model", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"dsv3 info: error: --model: folder not found: {tmp_path / 'absent'}\n"


def test_library_error_is_one_line_exit_1(capsys):
    assert main(["info", "--preset", "huge"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsv3 info: error: unknown preset 'huge'; choose one of ['16B', '236B', '671B', 'tiny']"]


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="unknown preset"):
        main(["--debug", "info", "--preset", "huge"])
    monkeypatch.setenv("DSV3_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown preset"):
        main(["info", "--preset", "huge"])


def test_bad_command_line_is_one_line_exit_2(capsys):
    cases = [(["bogus"], "dsv3: error: argument VERB: invalid choice: 'bogus'"),
             (["info", "--nope"], "dsv3 info: error: unrecognized arguments: --nope"),
             (["generate", "--prompt", "x", "--top-p", "1.5"], "dsv3 generate: error: argument --top-p: must be in"),
             (["serve", "--port", "70000"], "dsv3 serve: error: argument --port: must be a TCP port"),
             (["chat", "--device", "tpu"], "dsv3 chat: error: argument --device: must be cpu, cuda or cuda:N"),
             (["eval", "--cache-memory", "lots"], "dsv3 eval: error: argument --cache-memory: must be a size"),
             (["data", "tokenize"], "dsv3 data tokenize: error: the following arguments are required"),
             (["convert"], "dsv3 convert: error: the following arguments are required: DIRECTION")]
    for argv, start in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith(start) and captured.err.count("\n") == 1, captured.err
        assert captured.out == ""
    assert main([]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_help_exits_0_and_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)


def test_every_flag_has_help_that_names_its_default():
    for parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{parser.prog}: {action.option_strings} has no help"
                text = parser.formatter_class(parser.prog)._get_help_string(action)
                if not action.required:
                    assert "default" in text, f"{parser.prog}: {action.option_strings}"


def test_dtype_and_device_are_one_vocabulary_across_verbs():
    """Each inference verb takes exactly auto|bfloat16|float16|float32 and the same --device default; the
    flags become the same EngineConfig dtype, with auto = float32 on a CPU and bfloat16 on a GPU."""
    want = {("auto", "cpu"): "float32", ("auto", "cuda"): "bfloat16"}
    for verb in DTYPE_VERBS:
        p = _verb_parser(verb)
        dtype = next(a for a in p._actions if a.dest == "dtype")
        device = next(a for a in p._actions if a.dest == "device")
        assert tuple(dtype.choices) == ("auto", "bfloat16", "float16", "float32") and dtype.default == "auto", verb
        assert device.default is None and "cuda if available, else cpu" in device.help, verb
        for name in dtype.choices:
            args = p.parse_args([*REQUIRED[verb], "--dtype", name])
            for dev in ("cpu", "cuda"):
                assert flags.engine_config(args, dev).resolved_dtype == want.get((name, dev), name), (verb, name)
        for old in ("bf16", "fp32", "fp16"):
            with pytest.raises(SystemExit):
                p.parse_args([*REQUIRED[verb], "--dtype", old])


def test_engine_flags_build_one_engine_config():
    from dsv3.engine.config import EngineConfig

    p = _verb_parser("serve")
    assert flags.engine_config(p.parse_args([]), "cpu") == EngineConfig(device="cpu", dtype="auto")
    args = p.parse_args(["--num-blocks", "40", "--block-size", "8", "--max-num-seqs", "3", "--max-num-batched-tokens",
                         "24", "--max-model-len", "100", "--no-prefix-caching", "--no-fast", "--dtype", "float16"])
    assert flags.engine_config(args, "cuda:1") == EngineConfig(
        device="cuda:1", dtype="float16", num_blocks=40, block_size=8, max_num_seqs=3, max_num_batched_tokens=24,
        max_model_len=100, enable_prefix_caching=False, fast=False)
    assert flags.engine_config(p.parse_args(["--cache-memory", "3M"]), "cpu").cache_memory == 3 * 2**20
    with pytest.raises(flags.UsageError, match="max_num_batched_tokens"):
        flags.engine_config(p.parse_args(["--max-num-seqs", "100", "--max-num-batched-tokens", "50"]), "cpu")
    with pytest.raises(flags.UsageError, match="--fast needs a CUDA device"):
        flags.engine_config(p.parse_args(["--fast"]), "cpu")
    with pytest.raises(flags.UsageError, match="num_blocks and cache_memory"):
        flags.engine_config(p.parse_args(["--num-blocks", "4", "--cache-memory", "1G"]), "cpu")


def test_cpu_cache_fits_the_sequences_that_run_at_once():
    import torch

    from dsv3.config import ModelArgs
    from dsv3.engine import LLM, SamplingParams
    from dsv3.engine.config import EngineConfig
    from dsv3.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny").replace(dtype="float32"))
    base = EngineConfig(device="cpu", dtype="float32", block_size=4)
    cfg = flags.fit_cpu_cache(base, model, [10 + 6, 7 + 6])
    assert cfg.num_blocks * cfg.block_size >= 10 + 6 + 7 + 6 and cfg.num_blocks < 64
    llm = LLM(model, config=cfg)
    outs = llm.generate([list(range(2, 12)), list(range(3, 10))], SamplingParams(temperature=0, max_tokens=6,
                                                                                 ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [6, 6] and llm.num_preemptions == 0  # both ran at once
    for given in (dict(num_blocks=3), dict(cache_memory=2**20), dict(device="cuda")):  # sizes given, or a GPU
        other = EngineConfig(**{**dataclasses.asdict(base), **given})
        assert flags.fit_cpu_cache(other, model, [16, 13]) is other
    assert flags.fit_cpu_cache(base, model, [10**9]) is base  # above the default: the default stays


def test_fast_flag_defaults_to_the_engine_choice_and_needs_cuda(tmp_path, capsys):
    from dsv3.config import ModelArgs

    for verb in DTYPE_VERBS:
        p = _verb_parser(verb)
        assert p.parse_args(REQUIRED[verb]).fast is None  # the engine decides: on for BF16 on CUDA
        assert p.parse_args([*REQUIRED[verb], "--fast"]).fast is True
        assert p.parse_args([*REQUIRED[verb], "--no-fast"]).fast is False
        help_text = " ".join(p.format_help().split())
        assert "--fast, --no-fast" in help_text and "--no-fast forces the plain PyTorch path" in help_text
    (tmp_path / "config.json").write_text(json.dumps(ModelArgs.from_preset("tiny").to_hf_config()))
    for verb in ("generate", "serve", "chat"):  # refused before the model is loaded: one line, exit 2
        assert main([verb, *REQUIRED[verb], "--model", str(tmp_path), "--fast", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err == f"dsv3 {verb}: error: --fast needs a CUDA device (--device cuda), got --device cpu\n"


def test_one_model_resolver_for_every_verb(tmp_path, monkeypatch, capsys):
    import dsv3

    (tmp_path / "t.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_model"
    for verb in DTYPE_VERBS:
        assert main([verb, *REQUIRED[verb], "--model", str(missing)]) == 2, verb
        assert capsys.readouterr().err == f"dsv3 {verb}: error: --model: folder not found: {missing}\n"
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err

    def not_installed():
        raise FileNotFoundError("the built-in default model is not installed at /x; pass --model DIR")

    monkeypatch.setattr(dsv3, "default_model_path", not_installed)
    monkeypatch.setattr(dsv3, "default_chat_model_path", not_installed)  # chat and serve default to the chat model
    for verb in DTYPE_VERBS:
        assert main([verb, *REQUIRED[verb]]) == 2
        assert capsys.readouterr().err == (f"dsv3 {verb}: error: no --model given and the built-in default model "
                                           "is not installed at /x; pass --model DIR\n")
    monkeypatch.setattr(dsv3, "default_model_path", lambda: tmp_path)
    with pytest.raises(flags.UsageError, match="default model folder"):
        flags.resolve_model(None)  # tmp_path holds no config.json
    monkeypatch.undo()
    # without --model: the chat model for chat and serve (and generate --chat), the base model otherwise; an
    # adapter folder given as --model resolves to its merged checkpoint
    chat = dsv3.default_chat_model_path()
    assert flags.resolve_model(None, chat=True) == chat and flags.resolve_model(None) == dsv3.default_model_path()
    assert flags.resolve_model(str(dsv3.default_model_path().parent / "default-chat-model")) == chat
    calls = []
    monkeypatch.setattr(flags, "resolve_model", lambda model, chat=False: calls.append(chat) or tmp_path / "x")
    monkeypatch.setattr(flags, "resolve_device", lambda device: (_ for _ in ()).throw(flags.UsageError("stop")))
    for argv in (["chat"], ["serve"], ["generate", "--chat", "--prompt", "x"], ["generate", "--prompt", "x"]):
        assert main(argv) == 2 and capsys.readouterr().err.endswith("error: stop\n")
    assert calls == [True, True, True, False]


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import dsv3.cli.info

    def needs_uvicorn(args):
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    monkeypatch.setattr(dsv3.cli.info, "run", needs_uvicorn)
    assert main(["info"]) == 1
    hint = 'pip install -e ".[serve]"'
    assert capsys.readouterr().err.strip() == (f"dsv3 info: error: needs the Python package 'uvicorn': {hint} "
                                               "(in the dsv3 checkout)")
    assert hint in (ROOT / "README.md").read_text()  # the README gives the same command


def test_help_imports_no_torch_and_module_entry_point_runs():
    code = ("import sys\nfrom dsv3.cli import main\nfor verb in ([], ['generate'], ['serve'], ['eval'], ['chat']):\n"
            "    assert main([*verb, '--help']) == 0\nprint('torch' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "False", proc.stderr
    out = subprocess.run([sys.executable, "-m", "dsv3.cli", "info", "--preset", "tiny"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("tiny: 3 layers")
    bad = subprocess.run([sys.executable, "-m", "dsv3.cli", "info", "--preset", "huge"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_console_script_points_at_main():
    scripts = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "dsv3"]
    assert scripts and scripts[0].value == "dsv3.cli:main"
    assert scripts[0].load() is main


def test_ctrl_c_while_the_verb_is_imported_or_parsed_is_one_line_130(monkeypatch, capsys):
    import dsv3.cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsv3.cli.importlib, "import_module", interrupted)
    assert main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "dsv3 generate: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "generate", "--prompt", "x"])


def test_ctrl_c_in_the_first_seconds_of_a_real_run(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "generate", "--prompt", "x", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(0.4)  # while the verb imports torch (Ctrl-C during generation is the generate verb's own business)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "dsv3 generate: interrupted"


def test_closed_stdout_pipe_ends_quietly():
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as after `| head -1`
    try:
        proc = subprocess.run([sys.executable, "-m", "dsv3.cli", "info", "--preset", "tiny"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_version_and_python_dash_m_dsv3(capsys):
    import dsv3

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"dsv3 {dsv3.__version__}\n"
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"dsv3 {dsv3.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "dsv3", "info", "--preset", "tiny"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("tiny: 3 layers"), proc.stderr
    bad = subprocess.run([sys.executable, "-m", "dsv3", "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 0 and bad.stdout == f"dsv3 {dsv3.__version__}\n"


def test_sampling_flags_cover_what_sampling_params_supports(capsys):
    for verb in ("generate", "chat"):
        p = _verb_parser(verb)
        params = flags.sampling_params(p.parse_args(REQUIRED[verb]))
        assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.stop) == (0.0, 0.0, 0.0, [])
        assert params.repetition_penalty == 1.0
        args = p.parse_args([*REQUIRED[verb], "--min-p", "0.05", "--presence-penalty", "0.5", "--frequency-penalty",
                             "-1", "--stop", "\n\n", "--stop", "User:", "--top-k", "40", "--seed", "7",
                             "--repetition-penalty", "1.3"])
        params = flags.sampling_params(args)
        assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.05, 0.5, -1.0)
        assert params.repetition_penalty == 1.3
        assert params.stop == ["\n\n", "User:"] and params.top_k == 40 and params.seed == 7
    for bad, start in ((["--min-p", "1.5"], "argument --min-p: must be in [0, 1]"),
                       (["--presence-penalty", "3"], "argument --presence-penalty: must be in [-2, 2]"),
                       (["--frequency-penalty", "x"], "argument --frequency-penalty: must be a number in [-2, 2]"),
                       (["--stop", ""], "argument --stop: must not be empty"),
                       (["--repetition-penalty", "0"], "argument --repetition-penalty: must be in (0, 10]"),
                       (["--repetition-penalty", "nan"], "argument --repetition-penalty: must be in (0, 10]")):
        assert main(["generate", "--prompt", "x", *bad]) == 2
        assert capsys.readouterr().err.startswith(f"dsv3 generate: error: {start}"), bad


def test_weights_flag_keeps_fp8_in_memory_with_its_policy(tmp_path):
    import torch

    import dsv3
    from dsv3.config import ModelArgs
    from dsv3.engine import LLM, SamplingParams
    from dsv3.model import Transformer
    from dsv3.model.fp8_linear import FP8Linear

    torch.manual_seed(0)
    dsv3.save_model(Transformer(ModelArgs.from_preset("tiny")), tmp_path)
    p = flags.Parser(prog="dsv3 x")
    flags.add_model(p, weights=True)
    flags.add_dtype(p)
    flags.add_engine(p)
    assert p.parse_args([]).weights == "auto" and p.parse_args([]).fp8_policy == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--weights", "int4"])
    with pytest.raises(SystemExit):
        p.parse_args(["--fp8-policy", "w4a8"])
    args = p.parse_args(["--weights", "fp8", "--fp8-policy", "w8a8", "--model", str(tmp_path)])
    config = flags.engine_config(args, "cpu")
    assert (config.weights, config.fp8_policy) == ("fp8", "w8a8")
    model = flags.load_model(args, tmp_path, config)
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(m.policy == "w8a8" for m in fp8)
    # auto on a CPU: a BF16 checkpoint stays unquantized
    assert not any(isinstance(m, FP8Linear) for m in flags.load_model(p.parse_args([]), tmp_path, config).modules())
    llm = LLM(model, config=flags.fit_cpu_cache(config, model, [10]))
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 3


def test_readme_setup_line_asks_for_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("pip install torch"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup and "dsv3 generate" in setup
    assert "CUDA build" in readme  # and says what the plain install brings


def test_ctrl_c_while_torch_imports_stops_even_if_the_import_swallows_it(tmp_path):
    """A KeyboardInterrupt raised inside torch's import can be swallowed there (the run went on to the end) or
    abort the process; `main` imports torch with Ctrl-C ending the process. A stand-in torch that swallows it:"""
    import os
    import signal
    import time

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import sys, time\nsys.stderr.write('importing\\n'); sys.stderr.flush()\nend = time.time() + 30\n"
        "while time.time() < end:\n    try:\n        time.sleep(0.05)\n    except BaseException:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "convert", "fp8-to-bf16", "--input", "a", "--output", "b"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stderr.readline() == "importing\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()  # without the guard: the import ends after 30 s, then "input not found", exit 1
    assert proc.wait(timeout=60) == 130 and err == "dsv3 convert fp8-to-bf16: interrupted\n", err


def test_weights_fp8_flag_keeps_fp8_weights_in_generate():
    """`dsv3 generate --weights fp8` loads the Linear weights as FP8 (the engine then runs the plain path) and
    prints the greedy text that `LLM` gives on `load_model(weights="fp8")`."""
    import subprocess
    import sys

    import torch

    import dsv3
    from dsv3.engine import LLM, SamplingParams

    folder = dsv3.default_model_path()
    cmd = [sys.executable, "-m", "dsv3.cli", "generate", "--model", str(folder), "--weights", "fp8", "--device",
           "cpu", "--prompt", "The Python interpreter", "--max-new-tokens", "6", "--temperature", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    model = dsv3.load_model(folder, dtype=torch.float32, weights="fp8", progress=False)
    assert any(t.dtype == torch.float8_e4m3fn for t in [*model.parameters(), *model.buffers()])
    llm = LLM(model, tokenizer=folder, num_blocks=64)
    out = llm.generate("The Python interpreter", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert run.stdout.rstrip("\n") == out.text
