"""The user's own code: where it is found (``--code DIR``, the working directory) and how an
import path such as ``my_pkg.nets:build`` becomes a callable, with one-line errors.

Only the import path is ever stored (in the config and so in every checkpoint), never a pickled
class: a checkpoint keeps loading with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

from trainer.errors import ConfigError

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``package.module:attribute`` (the attribute may be dotted: ``module:Class.build``)."""


def is_import_path(text: str) -> bool:
    """Whether ``text`` names user code (``module:attr``) rather than a built-in choice."""
    return ":" in text and not text.lower().startswith("timm:")


def add_code_dirs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Put ``dirs`` and the working directory first on ``sys.path``, and on ``PYTHONPATH`` for
    processes started later (spawned DataLoader workers, compile workers)."""
    found = []
    for folder in dirs:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--code: folder '{folder}' not found; pass the folder that holds your package")
        found.append(path)
    paths = [str(p) for p in [*found, Path.cwd()]]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([*(p for p in paths if p not in old), *old])
    return found


def load_callable(spec: str, key: str) -> Callable:
    """The callable named by ``spec`` (``module:attr``); a ConfigError naming ``key`` otherwise."""
    if not IMPORT_PATH.match(spec):
        raise ConfigError(f"{key}: '{spec}' is not an import path; expected package.module:function, "
                          "e.g. my_pkg.nets:build")
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself (or its package) is absent
            raise ConfigError(f"{key}: cannot import '{module_name}' (no module named '{exc.name}'); run from "
                              "the folder that holds it or pass --code DIR") from None
        raise ConfigError(f"{key}: importing '{module_name}' failed: {_where(exc)}") from None
    except Exception as exc:  # SyntaxError, an ImportError inside the user's module, any error at import
        raise ConfigError(f"{key}: importing '{module_name}' failed: {_where(exc)}") from None
    target: object = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: '{module_name}' has no attribute '{attr_path}'{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: '{spec}' is a {type(target).__name__}, not a function or class")
    return target


def _where(exc: BaseException) -> str:
    """``Type: message (file:line)`` of an exception raised in user code."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    last = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {message}{last}"
