"""Every command, current and future, inherits the shared validation: bad options and unwritable outputs
fail with exit code 2 and one line, before any work. Commands are discovered from the click groups, so a
new command is covered as soon as it uses the shared option decorators."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mokd.cli import mokd_eval, mokd_train
from tests.core.test_validation import unwritable_directory

COMMANDS = sorted(mokd_eval.commands)


def filler_arguments(command: click.Command, skip: set[str]) -> list[str]:
    """Values for the required parameters the test does not care about (given after the option under test,
    which click therefore validates first)."""
    args: list[str] = []
    for param in command.params:
        if not param.required or param.name in skip:
            continue
        value = param.type.choices[0] if isinstance(param.type, click.Choice) else "1"
        if isinstance(param, click.Argument):
            args.append("missing-checkpoint.pth" if "checkpoint" in (param.name or "") else value)
        else:
            args += [param.opts[0], str(value)]
    return args


def invoke(group: click.Command, args: list[str]):
    result = CliRunner().invoke(group, args)
    lines = result.output.strip().splitlines()
    return result, lines


def option_cases() -> list[tuple[str, str, str, str]]:
    """(command, option, bad value, expected message part) for every command having that option."""
    bad = {"--out": None, "--output-dir": None, "--image-size": ("0", "out of range: use 8 to 2048"),
           "--num-workers": ("-1", "out of range: use 0"), "--device": ("tpu", "not a device mokd supports"),
           "--batch-size": ("0", "must be positive")}
    cases = []
    for name in COMMANDS:
        options = {opt for param in mokd_eval.commands[name].params for opt in param.opts}
        for option, spec in bad.items():
            if option in options:
                cases.append((name, option, *(spec or ("", ""))))
    return cases


@pytest.mark.parametrize("command,option,value,message", option_cases())
def test_every_command_rejects_bad_options_and_unwritable_outputs_in_one_line(tmp_path, command, option, value,
                                                                           message):
    subcommand = mokd_eval.commands[command]
    if option in ("--out", "--output-dir"):
        value = str(unwritable_directory(tmp_path) / ("out.json" if option == "--out" else "run"))
        message = "cannot write in"
    result, lines = invoke(mokd_eval, [command, option, value, *filler_arguments(subcommand, {option.strip("-")})])
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert option in lines[0] and message in lines[0]


def test_out_that_is_a_directory_is_refused_before_loading(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    for command in ("knn", "inspect"):
        result, lines = invoke(mokd_eval, [command, str(path), "--out", str(tmp_path)])
        assert result.exit_code == 2 and len(lines) == 1 and "is a directory" in lines[0], result.output


def test_default_results_location_is_checked_before_any_work(tmp_path, monkeypatch, checkpoint_factory,
                                                            tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    monkeypatch.chdir(tmp_path)
    Path("results").write_text("a file where the results folder should be")
    result, lines = invoke(mokd_eval, ["knn", str(path), "--data", "shapes:50", "--no-cache"])
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "results is a file, not a directory" in lines[0] and "checkpoint:" not in result.output


def test_unwritable_cache_dir_is_refused_before_loading(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    afile = tmp_path / "cache-file"
    afile.write_text("")
    for cache in (afile, unwritable_directory(tmp_path) / "cache"):
        result, lines = invoke(mokd_eval, ["knn", str(path), "--cache-dir", str(cache),
                                           "--out", str(tmp_path / "r.json")])
        assert result.exit_code == 2 and len(lines) == 1 and "--cache-dir" in lines[0], result.output


@pytest.mark.parametrize("args,message", [
    (["--output-dir", "UNWRITABLE"], "cannot write in"),
    (["--output-dir", "AFILE"], "is a file, not a directory"),
    (["--device", "tpu"], "not a device mokd supports"),
    (["--num-workers", "-1"], "out of range"),
    (["--img-size", "100000"], "out of range"),
    (["--img-size", "30"], "not a multiple of"),
])
def test_mokd_train_rejects_bad_settings_in_one_line_before_training(tmp_path, args, message):
    afile = tmp_path / "afile"
    afile.write_text("")
    replace = {"UNWRITABLE": str(unwritable_directory(tmp_path) / "run"), "AFILE": str(afile)}
    args = [replace.get(arg, arg) for arg in args]
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "run")]
    result, lines = invoke(mokd_train, ["--preset", "tiny", *args])
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def numeric_options(command: click.Command) -> list[click.Option]:
    """Every option of `command` that takes a number, read from the click declaration itself (so a new option
    is swept as soon as it exists), plus the comma-list --lr of the training protocols."""
    from mokd.core.validation import EVAL_NUMBER_RULES

    return [param for param in command.params if isinstance(param, click.Option)
            and (isinstance(param.type, click.types._NumberParamTypeBase) or param.opts[0] in EVAL_NUMBER_RULES)
            and not param.is_flag]


def number_cases() -> list[tuple[str, str, str]]:
    from mokd.core.validation import EVAL_NUMBER_RULES

    cases = []
    for name in COMMANDS:
        for option in numeric_options(mokd_eval.commands[name]):
            flag = option.opts[0]
            for value in ("nan", "inf", "-inf", "0"):
                if value == "0" and EVAL_NUMBER_RULES[flag].allows(0):
                    continue  # 0 is meaningful there (seed 0, no warm-up, no workers): the run would start
                cases.append((name, flag, value))
    return cases


def test_every_numeric_eval_option_has_a_rule():
    from mokd.core.validation import EVAL_NUMBER_RULES

    flags = {option.opts[0] for name in COMMANDS for option in numeric_options(mokd_eval.commands[name])}
    assert flags and flags <= set(EVAL_NUMBER_RULES), sorted(flags - set(EVAL_NUMBER_RULES))


@pytest.mark.slow  # the sweep runs every command a few hundred times; test-fast keeps the rule tests
@pytest.mark.parametrize("command,option,value", number_cases())
def test_every_command_refuses_nan_inf_and_meaningless_zero_for_each_numeric_option(tmp_path, command, option,
                                                                                    value):
    subcommand = mokd_eval.commands[command]
    skip = {param.name for param in subcommand.params if option in param.opts}
    out = ["--out", str(tmp_path / "r.json")] if "--out" in _flags(subcommand) else []
    result, lines = invoke(mokd_eval, [command, option, value, *out, *filler_arguments(subcommand, skip)])
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert list(tmp_path.iterdir()) == []


def _flags(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def assert_one_line_usage_error(result, lines: list[str], *named: str) -> None:
    """Click's refusal as one line naming what is wrong and where the help is, exit 2, nothing else printed."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help`)" in lines[0], result.output
    for name in named:
        assert name in lines[0], result.output


def usage_cases() -> list[tuple[str, list[str], str]]:
    """(command, arguments, what the message must name): an unknown option, an integer option given a
    fraction, a choice option given no choice of it, and (alone) a missing required argument."""
    cases = []
    for name in COMMANDS:
        command = mokd_eval.commands[name]
        filler = filler_arguments(command, set())
        cases.append((name, ["--no-such-option", *filler], "--no-such-option"))
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            skip = filler_arguments(command, {param.name})
            if isinstance(param.type, click.types.IntParamType):
                cases.append((name, [param.opts[0], "1.5", *skip], param.opts[0]))
            elif isinstance(param.type, click.Choice):
                cases.append((name, [param.opts[0], "no-such-choice", *skip], param.opts[0]))
        arguments = [param for param in command.params if isinstance(param, click.Argument) and param.required]
        if arguments:
            cases.append((name, [], arguments[0].human_readable_name))
    return cases


@pytest.mark.parametrize("command,args,named", usage_cases())
def test_click_refusals_are_one_line_naming_the_option_and_the_commands_help(tmp_path, monkeypatch, command, args,
                                                                           named):
    monkeypatch.chdir(tmp_path)
    result, lines = invoke(mokd_eval, [command, *args])
    assert_one_line_usage_error(result, lines, named, f"mokd-eval {command} --help")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,named", [
    (["--epochs", "nan"], "--epochs"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--lr-vit", "fast"], "--lr-vit"),
    (["--no-such-option"], "--no-such-option"),
    (["--epochs"], "--epochs"),  # no value at all
])
def test_mokd_train_click_refusals_are_one_line(tmp_path, args, named):
    result, lines = invoke(mokd_train, ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), *args])
    assert_one_line_usage_error(result, lines, named, "mokd-train --help")
    assert not (tmp_path / "run").exists()


def test_an_unknown_command_is_one_line_and_help_and_version_still_exit_0():
    result, lines = invoke(mokd_eval, ["no-such-command"])
    assert_one_line_usage_error(result, lines, "no-such-command", "mokd-eval --help")
    for group, args, shown in ((mokd_eval, ["--help"], "Usage: mokd-eval [OPTIONS]"),
                               (mokd_eval, ["knn", "--help"], "Usage: mokd-eval knn [OPTIONS] CHECKPOINT"),
                               (mokd_train, ["--help"], "Usage: mokd-train [OPTIONS]"),
                               (mokd_eval, ["--version"], "mokd-eval, version")):
        result = CliRunner().invoke(group, args)
        assert result.exit_code == 0 and result.output.startswith(shown), result.output
    bare = CliRunner().invoke(mokd_eval, [])
    assert bare.exit_code == 2 and "Commands:" in bare.output  # a bare group shows its help, as click does
