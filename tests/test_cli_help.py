"""Every `vnca COMMAND --help` states the default of each option that has one; the console
script offers the library's and the pipeline's commands, and `--help` imports no JAX or kfp."""

import argparse
import subprocess
import sys

import pytest

from vnca_pipeline import cli

COMMANDS = ("prepare-data", "train", "evaluate", "report", "compile", "run-local", "plan",
            "submit")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_optional_options_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.required or isinstance(action, argparse._HelpAction):
            continue
        shown = " ".join(formatter._expand_help(action).split())
        assert "default" in shown, f"{command} {action.option_strings[-1]}: {shown!r}"
        assert "".join(shown.split()) in text       # and that is what --help printed


def test_run_local_defaults_to_the_demo_tier():
    args = cli.build_parser().parse_args(["run-local"])
    assert (args.tier, args.smoke, args.full, args.verbose) == ("demo", False, False, False)


def test_the_console_script_has_every_command_and_the_library_its_own():
    from vnca import cli as library_cli

    def commands(parser):
        return list(next(a for a in parser._actions
                         if isinstance(a, argparse._SubParsersAction)).choices)

    assert commands(cli.build_parser()) == list(COMMANDS)
    assert commands(library_cli.build_parser()) == ["prepare-data", "train", "evaluate", "report"]


@pytest.mark.parametrize("command", ["report", "compile"])
def test_help_imports_neither_jax_nor_kfp(command):
    code = ("import sys\n"
            "from vnca_pipeline.cli import main\n"
            "try:\n"
            f"    main([{command!r}, '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'kfp')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
