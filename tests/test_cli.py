"""The command line people type: ``--key value``, ``--section.key=value``, aliases and ``--help``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer import config
from trainer.__main__ import _run, parse_args
from trainer.config import cli
from trainer.errors import ConfigError


def resolved(argv: list[str]) -> config.Config:
    line = parse_args(argv)
    return config.load(line.config, line.overrides)


@pytest.mark.parametrize("argv", [
    ["--epochs", "10", "--model", "ResNet34", "--lr", "0.05", "--batch-size", "32", "--workers", "0",
     "--resume", "never"],
    ["--train.epochs=10", "--model.name=ResNet34", "--optim.lr=0.05", "--data.batch-size=32",
     "--data.num_workers", "0", "--ckpt.resume", "never"],
    ["--epochs=10", "model.name=ResNet34", "--optim.lr", "0.05", "--batch_size", "32", "data.num_workers=0",
     "--resume=never"],
])
def test_every_spelling_resolves_to_the_same_config_as_key_value(argv: list[str]) -> None:
    expected = config.load(overrides=["train.epochs=10", "model.name=ResNet34", "optim.lr=0.05",
                                      "data.batch_size=32", "data.num_workers=0", "ckpt.resume=never"])
    assert resolved(argv) == expected
    assert expected.train.epochs == 10 and expected.model.name == "ResNet34"


def test_files_code_and_keys_mix_in_any_order(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 0.3\ntrain:\n  epochs: 4\n")
    line = parse_args(["--lr", "0.2", "-c", str(extra), "--code", "src", "--epochs", "5", "--config", str(extra)])
    assert line.config == [str(extra), str(extra)] and line.code == ["src"]
    cfg = config.load(line.config, line.overrides)
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 5  # keys beat files wherever they are written


def test_boolean_key_without_value_means_true_and_negative_numbers_are_values() -> None:
    cfg = resolved(["--model.compile", "--data.hflip", "false", "--sched.min_lr_ratio", "-0"])
    assert cfg.model.compile is True and cfg.data.hflip is False
    with pytest.raises(ConfigError, match="train.seed: must be >= 0, got -1"):
        resolved(["--train.seed", "-1"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--epoch", "3"], "unknown option '--epoch'; did you mean --epochs?"),
    (["--lr"], "option '--lr' needs a value, e.g. --lr VALUE or --lr=VALUE"),
    (["--name", "x", "--decay_norm_and_bias"], None),
    (["--seed", "1"], None),
    (["--std", "[1,1,1]"], None),
    (["-x"], "unknown option '-x'; config keys are written --key value or key=value"),
])
def test_unknown_or_incomplete_options_are_one_line(argv: list[str], message: str | None) -> None:
    if message is None:
        resolved(argv)  # unique leaf names are accepted
        return
    with pytest.raises(ConfigError) as error:
        resolved(argv)
    assert str(error.value).startswith(message)


def test_ambiguous_leaf_names_the_candidates() -> None:
    with pytest.raises(ConfigError, match="'--every_steps' is ambiguous; write one of --ckpt.every_steps, "
                                          "--log.every_steps"):
        cli.cli_key("every_steps")


def test_help_lists_every_key_with_its_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--epochs", "3", "--help"]) == 0  # prints, starts nothing
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    comments = cli._yaml_comments(cli.DEFAULT_YAML)
    for key, default in config.flatten(config.to_dict(config.Config())).items():
        shown, _, meaning = lines[f"--{key}"].split(f"--{key}", 1)[1].strip().partition("  ")
        assert yaml.safe_load(shown) == default, key
        assert meaning.strip() == comments[key], key
    assert "--epochs = train.epochs" in out and "--code DIR" in out
