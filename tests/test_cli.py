"""The `dsv3` command line: verbs registered, counts printed, user errors as one line."""

import argparse
import subprocess
import sys

from dsv3.cli import build_parser, main


def test_info_prints_counts(capsys):
    assert main(["info", "--preset", "671B"]) == 0
    out = capsys.readouterr().out
    assert "parameters (main model)        671.026B" in out
    assert "36.7B activated" in out


def test_bad_preset_is_one_line_error(capsys):
    assert main(["info", "--preset", "huge"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsv3 info: error: unknown preset 'huge'; choose one of ['16B', '236B', '671B', 'tiny']"]


def _leaf_parsers(parser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in sub.choices.values():
            yield from _leaf_parsers(child)


def test_every_flag_has_help():
    out = subprocess.run([sys.executable, "-m", "dsv3.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout
    for parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{parser.prog}: {action.option_strings} has no help"


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import dsv3.cli_info

    def needs_uvicorn(args):
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    monkeypatch.setattr(dsv3.cli_info, "run", needs_uvicorn)
    assert main(["info"]) == 1
    assert capsys.readouterr().err.strip() == "dsv3 info: error: needs the Python package 'uvicorn': pip install 'dsv3[serve]'"
