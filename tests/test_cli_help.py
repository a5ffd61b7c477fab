"""Every `vnca COMMAND --help` states the default of each option that has one."""

import argparse

import pytest

from vnca import cli

COMMANDS = ("prepare-data", "train", "evaluate", "report", "compile", "run-local", "submit")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_optional_options_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.required or isinstance(action, argparse._HelpAction):
            continue
        shown = " ".join(formatter._expand_help(action).split())
        assert "default" in shown, f"{command} {action.option_strings[-1]}: {shown!r}"
        assert shown in text                        # and that is what --help printed


def test_run_local_defaults_to_the_demo_tier():
    args = cli.build_parser().parse_args(["run-local"])
    assert (args.tier, args.smoke, args.full, args.verbose) == ("demo", False, False, False)
