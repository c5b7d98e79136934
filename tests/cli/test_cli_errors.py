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
    result, _ = invoke(mokd_eval, [command, option, value, *out, *filler_arguments(subcommand, skip)])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert list(tmp_path.iterdir()) == []


def _flags(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}
