"""Issue 18, class 2: numbers that are not numbers. NaN, infinity and a meaningless zero are refused in one line,
exit 2, naming the option, before any work, for every numeric setting of mokd-train (flags and YAML) and the
evaluation commands (their all-commands sweep is in tests/test_cli_errors.py)."""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner

from mokd.cli import mokd_eval, mokd_train
from mokd.core.errors import MokdError
from mokd_eval.protocols import parse_lrs
from mokd.core.validation import NON_NEGATIVE, POSITIVE, Range, check_number
from mokd_train.config import NUMBER_RULES as SETTING_RULES, resolve_config
from mokd_train.slurm import SLURM_NUMBER_RULES

# Every numeric option of mokd-train: its settings and the numbers of a SLURM request.
NUMBER_RULES = {**SETTING_RULES, **SLURM_NUMBER_RULES}


def train_numeric_options() -> list[click.Option]:
    return [param for param in mokd_train.params if isinstance(param, click.Option)
            and isinstance(param.type, click.types._NumberParamTypeBase)]


def train_cases() -> list[tuple[str, str]]:
    cases = []
    for option in train_numeric_options():
        for value in ("nan", "inf", "0"):
            if value == "0" and NUMBER_RULES[option.name].allows(0):
                continue
            cases.append((option.opts[0], value))
    return cases


def test_every_numeric_training_setting_has_a_rule():
    names = {option.name for option in train_numeric_options()}
    assert names and names <= set(NUMBER_RULES), sorted(names - set(NUMBER_RULES))


@pytest.mark.slow  # the sweep runs mokd-train once per numeric option and value
@pytest.mark.parametrize("option,value", train_cases())
def test_mokd_train_refuses_nan_inf_and_meaningless_zero_before_training(tmp_path, option, value):
    run = tmp_path / "run"
    result = CliRunner().invoke(mokd_train, ["--preset", "tiny", "--output-dir", str(run), option, value])
    assert result.exit_code == 2, result.output
    setting = option[2:].replace("-", "_")
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert option in lines[0] or f"'{setting}'" in lines[0], result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not run.exists()


@pytest.mark.parametrize("text,setting", [("teacher_temp: .nan\n", "teacher_temp"),
                                          ("lr_vit: .inf\n", "lr_vit"),
                                          ("warmup_teacher_temp: 0\n", "warmup_teacher_temp"),
                                          ("lambda1: -.inf\n", "lambda1")])
def test_yaml_numbers_are_checked_like_flags(tmp_path, text, setting):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(MokdError, match=f"'{setting}'") as caught:
        resolve_config("tiny", config, {"output_dir": str(tmp_path / "run")})
    assert "\n" not in str(caught.value)


def test_lr_lists_refuse_nan_and_name_the_bad_value():
    assert parse_lrs("0.01,0.1") == (0.01, 0.1)
    for text in ("nan", "0.1,inf", "0.1,0"):
        with pytest.raises(MokdError, match="--lr"):
            parse_lrs(text)


def test_ranges_say_what_they_allow():
    assert POSITIVE.allows(1e-9) and not POSITIVE.allows(0.0)
    assert NON_NEGATIVE.allows(0.0) and not NON_NEGATIVE.allows(-1e-9)
    assert not Range(nonzero=True).allows(0) and Range(nonzero=True).allows(-1)
    assert check_number(0.5, "--x", Range(0, 1)) == 0.5
    with pytest.raises(MokdError, match=r"--x inf is not a finite number: use a number >= 0 and <= 1"):
        check_number(math.inf, "--x", Range(0, 1))
    with pytest.raises(MokdError, match=r"--x 2 is out of range: use a number >= 0 and <= 1"):
        check_number(2.0, "--x", Range(0, 1))


def test_a_refused_number_leaves_earlier_results_byte_identical(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    out = tmp_path / "knn.json"
    out.write_bytes(b'{"earlier": "results"}\n')
    before = out.read_bytes()
    for value in ("nan", "0", "-inf"):
        result = CliRunner().invoke(mokd_eval, ["knn", str(path), "--temperature", value, "--out", str(out)])
        assert result.exit_code == 2 and "--temperature" in result.output, result.output
        assert "checkpoint:" not in result.output  # refused before loading
    assert out.read_bytes() == before
