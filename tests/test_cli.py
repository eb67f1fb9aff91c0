"""The `dsv3` command line: verbs registered, counts printed, user errors as one line."""

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


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "dsv3.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout
    for action in build_parser()._subparsers._group_actions[0].choices.values():
        for opt in action._actions:
            assert opt.help, f"{action.prog}: {opt.option_strings} has no help"
