"""``python -m trainer``'s command line: ``-c FILE``, ``--code DIR``, ``--help`` and config keys in
the spellings people type (``--batch-size 64``, ``--model.compile``), all turned into ``key=value``
overrides for :func:`trainer.config.load`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config import Config, flatten, schema_keys, to_dict
from trainer.errors import ConfigError

ALIASES: dict[str, str] = {
    "epochs": "train.epochs", "model": "model.name", "lr": "optim.lr", "batch-size": "data.batch_size",
    "workers": "data.num_workers", "resume": "ckpt.resume", "weights": "model.weights", "name": "log.name",
}
"""Short spellings of the most used keys: ``--epochs 10`` is ``train.epochs=10``."""

BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")
"""What may follow a boolean option as its value; anything else is the next argument."""

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
"""Where each key's one-line meaning is written (as the comment on its line)."""


@dataclass
class CommandLine:
    """What ``python -m trainer`` was asked: YAML files, ``key=value`` overrides, code folders."""

    config: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    help: bool = False


def parse_command_line(argv: list[str]) -> CommandLine:
    """Read ``-c FILE``, ``--code DIR``, ``-h`` and the config keys in any of these spellings:
    ``key=value``, ``--key value``, ``--key=value``, ``--section.key`` (dashes or underscores),
    a key's unique leaf name (``--batch_size``) or an alias (``--batch-size``, see :data:`ALIASES`).
    A boolean key given without a value means true (``--model.compile``)."""
    line, tokens = CommandLine(), list(argv)
    while tokens:
        token = tokens.pop(0)
        if token in ("-h", "--help"):
            line.help = True
            continue
        if not token.startswith("-"):
            line.overrides.append(token)
            continue
        name, eq, value = token.lstrip("-").partition("=")
        if token.startswith("-") and not token.startswith("--") and name not in ("c",):
            raise ConfigError(f"unknown option {token!r}; config keys are written --key value or key=value")
        if not eq:
            is_bool = name not in ("c", "config", "code") and schema_keys().get(cli_key(name)) in (bool, "bool")
            if tokens and not tokens[0].startswith("--") and (not is_bool or tokens[0].lower() in BOOL_WORDS):
                value = tokens.pop(0)
            elif is_bool:
                value = "true"
            else:
                raise ConfigError(f"option {token!r} needs a value, e.g. {token} VALUE or {token}=VALUE")
        if name in ("c", "config"):
            line.config.append(value)
        elif name == "code":
            line.code.append(value)
        else:
            line.overrides.append(f"{cli_key(name)}={value}")
    return line


def cli_key(name: str) -> str:
    """The schema key an option names (``--batch-size`` -> ``data.batch_size``)."""
    if name in ALIASES:
        return ALIASES[name]
    known = schema_keys()
    key = name.replace("-", "_")
    if key in known:
        return key
    leaf_matches = [k for k in known if k.rsplit(".", 1)[-1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise ConfigError(f"option {'--' + name!r} is ambiguous; write one of {', '.join('--' + k for k in leaf_matches)}")
    close = difflib.get_close_matches(key, [*ALIASES, *known], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "see python -m trainer --help"
    raise ConfigError(f"unknown option {'--' + name!r}; {hint}")


def help_text() -> str:
    """Usage, the aliases, and every key with its default and meaning (from configs/default.yaml)."""
    meanings = _yaml_comments(DEFAULT_YAML)
    defaults = flatten(to_dict(Config()))
    width = max(len(k) for k in defaults) + 3
    lines = [
        "usage: python -m trainer [-c FILE.yaml]... [--code DIR]... [key=value | --key value | --key=value]...",
        "",
        "Train an image classifier (one process per device). Precedence: defaults < -c files < keys.",
        "",
        "options:",
        f"  {'-c, --config FILE.yaml':<{width + 10}}YAML config file; repeat to layer several (later ones win)",
        f"  {'--code DIR':<{width + 10}}folder with your own package, put on sys.path (repeatable)",
        f"  {'-h, --help':<{width + 10}}show this help and exit",
        "",
        "short aliases: " + ", ".join(f"--{alias} = {key}" for alias, key in ALIASES.items()),
        "",
        "keys (default, then meaning):",
    ]
    section = ""
    for key, default in defaults.items():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"{section}:")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  --{key:<{width}} {shown:<20}  {meanings.get(key, '')}".rstrip())
    lines += ["", "Example: python -m trainer --epochs 10 --model ResNet34 --lr 0.05 data.source=cifar10 data.root=/data"]
    return "\n".join(lines)


def _yaml_comments(path: Path) -> dict[str, str]:
    """``section.key`` -> the comment on its line in ``path`` (empty when the file is absent)."""
    comments: dict[str, str] = {}
    if not path.is_file():
        return comments
    section = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, rest = line.strip().partition(":")
        if not line.startswith(" "):
            section = key
        elif "#" in rest:
            comments[f"{section}.{key}"] = rest.split("#", 1)[1].strip()
    return comments
