"""A model's blocks: the units a sharded strategy gathers one at a time and activation
checkpointing recomputes one at a time (a residual block, a transformer block).

``auto`` finds them by structure: the children of a container (``nn.Sequential``,
``nn.ModuleList``) that repeat a class of composite modules with parameters (not single layers),
e.g. torchvision ResNet's ``BasicBlock``/``Bottleneck``, ViT's ``EncoderBlock``, Swin's
``SwinTransformerBlock``, timm's ``Block`` and ``ConvNeXtBlock``. The
user's own model can name its block classes instead (``dist.shard_blocks=MyBlock,MyStem``).
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

from torch import nn

from trainer.errors import ConfigError

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

SAVED_BY_SELECTIVE = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
                      "aten._scaled_dot_product")
"""Op name prefixes whose outputs selective checkpointing keeps: the expensive ones to recompute."""


def find_blocks(model: nn.Module, spec: str = "auto") -> list[nn.Module]:
    """The model's blocks, innermost first (the order in which they must be sharded), ``spec``
    being ``auto`` or comma-separated class names; a named class the model lacks is an error."""
    if spec.strip().lower() == "auto":
        chosen = {id(m) for m in model.modules() if isinstance(m, CONTAINERS) for m in _repeated_children(m)}
    else:
        names = {name.strip() for name in spec.split(",") if name.strip()}
        present = {type(m).__name__ for m in model.modules()}
        if missing := sorted(names - present):
            raise ConfigError(f"dist.shard_blocks: the model has no module of class {', '.join(missing)}; "
                              f"its classes include {', '.join(sorted(present)[:8])}")
        chosen = {id(m) for m in model.modules() if type(m).__name__ in names and m is not model}
    return [m for m in _post_order(model) if id(m) in chosen]


def innermost(blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks that hold no other block (checkpointing a block inside a checkpointed one
    would recompute it twice)."""
    ids = {id(block) for block in blocks}
    return [block for block in blocks if not any(id(sub) in ids for sub in block.modules() if sub is not block)]


def checkpoint_activations(blocks: list[nn.Module], mode: str) -> None:
    """Recompute each block's activations in the backward instead of keeping them (``full``), or
    keep only matmul and convolution outputs (``selective``).

    Batch-norm outputs are always kept: recomputing them would update the running statistics a
    second time in the same step. The composable API hooks the block in place, so parameter names
    (and checkpoints) do not change.
    """
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    contexts = partial(create_selective_checkpoint_contexts, partial(_keep, mode == "selective"))
    for block in innermost(blocks):
        checkpoint(block, context_fn=contexts)


def _keep(selective: bool, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    if "batch_norm" in name or (selective and name.startswith(SAVED_BY_SELECTIVE)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _repeated_children(container: nn.Module) -> list[nn.Module]:
    children = [c for c in container.children() if not isinstance(c, CONTAINERS)
                and any(True for _ in c.children()) and any(True for _ in c.parameters())]
    counts = Counter(type(c) for c in children)
    return [c for c in children if counts[type(c)] > 1]


def _post_order(module: nn.Module) -> list[nn.Module]:
    return [m for child in module.children() for m in _post_order(child)] + [module]
