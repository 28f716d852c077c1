"""prg_fast.cli: one bounded-number type for every flag, every default shown by --help, the
commands' registry, and the old module paths (prg_fast.train / finetune / eval) failing with the new path named."""
import argparse
import importlib
import re
import sys

import pytest

from prg_fast import cli
from prg_fast.cli.args import bounded, nonnegative_float, positive_int, time_list, unit_time

COMMANDS = ["pretrain", "finetune", "evaluate", "extract", "repfusion", "genrep", "info"]


@pytest.mark.parametrize("parse, text, value", [
    (positive_int, "3", 3), (nonnegative_float, "0", 0.0), (unit_time, "1", 1.0),
    (bounded(float, 0.0, 1.0, hi_open=True), "0.5", 0.5), (bounded(int, -2, 2), "-2", -2)])
def test_bounded_accepts(parse, text, value):
    assert parse(text) == value and type(parse(text)) is type(value)


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "expected an integer >= 1, got 0"),
    (positive_int, "2.5", "expected an integer >= 1, got '2.5'"),
    (nonnegative_float, "-1", "expected a finite number >= 0, got -1"),
    (nonnegative_float, "inf", "expected a finite number >= 0, got inf"),
    (nonnegative_float, "nan", "got nan"),
    (unit_time, "1.5", "expected a time in [0, 1] (0 = data, 1 = noise), got 1.5"),
    (bounded(float, 0.0, 1.0, hi_open=True), "1", "expected a finite number >= 0 and < 1, got 1"),
    (time_list, "0.5,2", "comma-separated times in [0, 1]")])
def test_bounded_refuses_with_the_expectation(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(text)
    assert message in str(e.value)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
    for option in options:
        if option.startswith("-h, --help"):
            continue
        # store_true flags have no value to show; every option taking one names its default
        if re.match(r"--[\w-]+(, --no-[\w-]+)?\s+[A-Z{]", option) or "--hflip" in option:
            assert "(default:" in option, option


def test_presets_are_explained_where_a_preset_is_chosen(capsys):
    for command in ("pretrain", "finetune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "tiny for 8x8 images" in text and "cifar or prg32 for 32x32" in text


def test_every_command_is_registered():
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(choices) == COMMANDS


@pytest.mark.parametrize("old, new, name", [("prg_fast.train", "prg_fast.training.pretrain", "PretrainConfig"),
                                            ("prg_fast.finetune", "prg_fast.training.finetune", "FinetuneConfig"),
                                            ("prg_fast.eval", "prg_fast.training.evaluate", "linear_probe")])
def test_old_module_paths_fail_naming_the_new_ones(old, new, name):
    """The modules that moved into prg_fast.training: importing an old path is an error that says
    where the module is now (every time, not only the first); the new path works."""
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match=f"{old} moved to {new}") as e:
            importlib.import_module(old)
        assert e.value.name == old and old not in sys.modules
    assert hasattr(importlib.import_module(new), name)
    with pytest.raises(ModuleNotFoundError, match=f"{old} moved to {new}"):
        exec(f"from {old} import {name}", {})


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("none", None), ("0", 0.0), ("1e9", 1e9),
                                         ("inf", float("inf"))])
def test_finetune_memory_budget_flag(text, value):
    """finetune --memory-budget reaches the config (default "auto", the engine's default)."""
    from prg_fast.cli.args import config_from_args
    from prg_fast.training.finetune import FinetuneConfig

    parser = cli.build_parser()
    assert parser.parse_args(["finetune", "--data", "digits", "--out", "o"]).memory_budget == "auto" == FinetuneConfig().memory_budget
    args = parser.parse_args(["finetune", "--data", "digits", "--out", "o", "--memory-budget", text])
    assert config_from_args(FinetuneConfig, args).memory_budget == value


@pytest.mark.parametrize("text", ["-1", "lots", "nan"])
def test_finetune_memory_budget_flag_refuses(text, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--data", "digits", "--out", "o", "--memory-budget", text])
    assert "expected auto, none or a number of bytes >= 0" in capsys.readouterr().err
