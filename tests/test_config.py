"""The config schema, configs/default.yaml, the loader's precedence and its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
import yaml
from helpers import REPO

from trainer import config
from trainer.errors import ConfigError

DEFAULT_YAML = REPO / "configs" / "default.yaml"


def load_error(overrides: Sequence[str] = (), files: Sequence[Path] = ()) -> str:
    """The message of the ConfigError that loading must raise; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        config.load(files, overrides)
    message = str(info.value)
    assert "\n" not in message, f"multi-line error: {message!r}"
    return message


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# --- configs/default.yaml stays in sync with the schema ------------------------------------------

def assert_same_values(yaml_value: Any, schema_value: Any, key: str = "") -> None:
    """Equal values of the same types (1 is not 1.0, 0 is not False), recursively."""
    if isinstance(schema_value, dict):
        assert isinstance(yaml_value, dict), key
        assert sorted(yaml_value) == sorted(schema_value), f"{key or 'top level'}: keys differ"
        for name in schema_value:
            assert_same_values(yaml_value[name], schema_value[name], f"{key}.{name}".lstrip("."))
    elif isinstance(schema_value, list):
        assert isinstance(yaml_value, list) and len(yaml_value) == len(schema_value), key
        for i, (a, b) in enumerate(zip(yaml_value, schema_value)):
            assert_same_values(a, b, f"{key}[{i}]")
    else:
        assert (type(yaml_value), yaml_value) == (type(schema_value), schema_value), key


def test_default_yaml_equals_schema_defaults() -> None:
    assert_same_values(yaml.safe_load(DEFAULT_YAML.read_text()), config.to_dict(config.Config()))
    assert config.load([DEFAULT_YAML]) == config.load()  # loading it changes nothing


def yaml_key_lines(text: str) -> dict[str, tuple[str, str]]:
    """Each dotted key of a two-level YAML file mapped to (its line, the line above it)."""
    found: dict[str, tuple[str, str]] = {}
    section = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        name = stripped.split(":", 1)[0]
        if line == stripped:  # no indentation: a section header
            section = name
        else:
            found[f"{section}.{name}"] = (line, lines[i - 1])
    return found


def test_every_schema_key_is_documented_in_default_yaml() -> None:
    lines = yaml_key_lines(DEFAULT_YAML.read_text())
    assert sorted(lines) == sorted(config.schema_keys())
    undocumented = [key for key, (line, above) in lines.items()
                    if "#" not in line and not above.strip().startswith("#")]
    assert not undocumented, f"no comment on their line nor a comment line above: {undocumented}"


# --- precedence ------------------------------------------------------------------------------------

def test_precedence_defaults_files_in_order_then_overrides(tmp_path: Path) -> None:
    first = write(tmp_path, "first.yaml", "optim:\n  lr: 0.1\n  name: adam\ntrain:\n  epochs: 3\n")
    second = write(tmp_path, "second.yaml", "optim:\n  lr: 0.2\ntrain:\n  epochs: 4\n")

    cfg = config.load([first, second], ["train.epochs=5"])
    assert cfg.optim.lr == 0.2  # the later file wins over the earlier one
    assert cfg.optim.name == "adam"  # a later file setting a sibling key keeps this one
    assert cfg.train.epochs == 5  # overrides win over every file
    assert cfg.optim.momentum == config.OptimConfig().momentum  # untouched keys keep the default

    assert config.load([second, first]).optim.lr == 0.1  # file order, not file name, decides


# --- unknown keys, wrong types, invalid values -------------------------------------------------------

@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("optim.lrr=0.1", "optim.lrr", "optim.lr"),
    ("lr=0.1", "lr", "optim.lr"),
    ("train.epoch=3", "train.epoch", "train.epochs"),
])
def test_unknown_override_key_names_it_and_suggests_closest(override: str, key: str, suggestion: str) -> None:
    message = load_error([override])
    assert f"'{key}'" in message
    assert f"did you mean '{suggestion}'" in message


@pytest.mark.parametrize(("text", "key", "suggestion"), [
    ("optim:\n  lrr: 0.1\n", "optim.lrr", "optim.lr"),
    ("lr: 0.1\n", "lr", "optim.lr"),
])
def test_unknown_yaml_key_names_it_the_file_and_suggests_closest(
        tmp_path: Path, text: str, key: str, suggestion: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    message = load_error(files=[path])
    assert f"'{key}'" in message and str(path) in message
    assert f"did you mean '{suggestion}'" in message


@pytest.mark.parametrize(("override", "key", "expected_type"), [
    ("optim.lr=abc", "optim.lr", "float"),
    ("train.epochs=1.5", "train.epochs", "int"),
    ("log.debug=maybe", "log.debug", "bool"),
])
def test_wrong_type_names_key_and_expected_type(override: str, key: str, expected_type: str) -> None:
    message = load_error([override])
    assert message.startswith(f"{key}: expected {expected_type}")


def test_wrong_type_in_yaml_file_names_key_type_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "train:\n  epochs: 1.5\n")
    message = load_error(files=[path])
    assert message.startswith("train.epochs: expected int") and str(path) in message


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lr=-0.1", "optim.lr: must be > 0"),
    ("data.batch_size=0", "data.batch_size: must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay: must be >= 0"),
    ("log.straggler_ratio=1", "log.straggler_ratio: must be > 1"),
])
def test_out_of_range_values_are_rejected(override: str, expected: str) -> None:
    assert load_error([override]).startswith(expected)


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("optim.name=adamx", "optim.name", "adam"),
    ("train.precision=fp61", "train.precision", "fp16"),
])
def test_unknown_choice_lists_choices_and_suggests(override: str, key: str, suggestion: str) -> None:
    message = load_error([override])
    assert message.startswith(f"{key}: ")
    assert ", ".join({**config.CHOICES, **config.OPEN_CHOICES}[key]) in message
    assert f"did you mean '{suggestion}'" in message


CHOICE_CONTEXT = {"ckpt.format": ["dist.strategy=fsdp"]}
"""What a key's every choice needs beside it (a sharded checkpoint needs a sharding strategy)."""


@pytest.mark.parametrize("key", sorted(config.CHOICES))
def test_every_documented_choice_is_accepted_case_insensitively(key: str) -> None:
    rejected = []
    for value in config.CHOICES[key]:
        for spelling in (value.lower(), value.upper()):
            try:
                overrides = ["data.root=/data", *CHOICE_CONTEXT.get(key, []), f"{key}={spelling}"]
                loaded = config.get(config.load([], overrides), key)
            except ConfigError as exc:
                loaded = str(exc)
            if loaded != value:
                rejected.append(f"{spelling} -> {loaded}")
    assert not rejected


def test_choice_normalised_to_lower_case() -> None:
    assert config.load([], ["optim.name=AdamW"]).optim.name == "adamw"


def test_choice_written_in_yaml_file_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "bar.yaml", "log:\n  progress_bar: off\n")
    assert config.load([path]).log.progress_bar == "off"


# --- unreadable files --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("optim: {lr: [0.1\n", "is not valid YAML"),
    ("- optim.lr: 0.1\n- train.epochs: 2\n", "must hold a mapping"),
], ids=["unclosed-bracket", "list"])
def test_unreadable_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    message = load_error(files=[path])
    assert expected in message and str(path) in message


def test_empty_yaml_file_changes_nothing(tmp_path: Path) -> None:
    assert config.load([write(tmp_path, "empty.yaml", "")]) == config.load()


def test_missing_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert load_error(files=[path]) == f"config file not found: {path}"


# --- the command line, end to end --------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRAINER_DEBUG") and not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("model.name=resnet1000", "did you mean resnet101"),
])
def test_cli_user_error_exits_2_with_one_line(tmp_path: Path, override: str, expected: str) -> None:
    output_dir = tmp_path / "runs"
    result = run_cli(override, f"log.output_dir={output_dir}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not output_dir.exists()
