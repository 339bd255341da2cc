"""A digest of a checkpoint's contents, so that damage on disk is caught at load instead of
becoming the weights a run resumes from.

The digest covers what the checkpoint holds, not its bytes: every tensor's dtype, shape and data
and every plain value, walked in the dict's own order. torch's zip reader checks no CRC and its
unpickler accepts many altered streams, so a flipped bit can load without an error; it cannot
load with the same contents.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

KEY = "digest"
"""Where a checkpoint keeps its digest (a hex string beside the pieces)."""


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 over ``state`` without its own digest (hardware-accelerated on current CPUs)."""
    hasher = hashlib.sha256()
    _feed(hasher, {key: value for key, value in state.items() if key != KEY})
    return hasher.hexdigest()


def matches(state: dict[str, Any]) -> bool:
    """Take the digest out of a loaded ``state``; whether its contents match it (a state saved
    before digests existed has none, and matches; a user's tensor named ``digest`` is left alone).

    A digest found under another name (a flipped bit in the word ``digest``) does not match: the
    rest of the file is then unchecked."""
    if not isinstance(state.get(KEY), str):
        return not any(_looks_like_digest(value) for key, value in state.items() if key != KEY)
    return state.pop(KEY) == content_digest(state)


def _looks_like_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    else:  # str, int, float, bool, None, torch.Size...: their repr is exact
        hasher.update(f"{type(value).__name__}:{value!r};".encode())
