"""Errors a user can fix, and the process exit codes the Worker documents."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
"""Stopped by a signal (SIGTERM, SIGINT, the SLURM warning signal) after saving a checkpoint."""


class UserError(Exception):
    """A mistake in the config, data, checkpoint or environment, reported as one actionable line."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in the configuration."""


class DataError(UserError):
    """A data set that is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or does not match the model."""


class EnvironmentProblem(UserError):
    """The machine cannot do what the config asks (absent device, too many processes...)."""


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite (the message names the step)."""


class OutOfMemory(UserError):
    """The device ran out of memory in a training step (the message names the batch size)."""


def first_line(cause: BaseException | str) -> str:
    """The first non-blank line of an exception's (or a text's) message, for a one-line error;
    an exception with an empty message gives its type's name."""
    text = str(cause)
    found = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return found or (type(cause).__name__ if isinstance(cause, BaseException) else "")


def one_line(exc: BaseException) -> str:
    """The message of ``exc``, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    qualified = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(qualified):] if last.startswith(qualified) else last
