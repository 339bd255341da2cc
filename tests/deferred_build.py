"""Run under torchrun: a model built with deferred initialisation, sharded with FSDP2 per block and
given its values shard by shard (the layers' resets replayed, ``model.init``, or ``model.weights``
read from a memory-mapped file); rank 0 saves each case's whole state to ``argv[1]``.

The model mixes what a constructor can do: the sharding tests' residual net (convolutions,
BatchNorm and its running statistics), a multi-head attention (whose reset also sets its child's
bias), a LayerNorm, and a parameter of the model's own whose reset reaches past the model's children.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sharded_net import build as residual_net
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trainer.models import deferred, find_blocks
from trainer.models.weights import load_weights, read_weight_file


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.attention, self.norm = residual_net(3), nn.MultiheadAttention(8, 2), nn.LayerNorm(8)
        self.token = nn.Parameter(torch.zeros(1, 5, 8))  # the root's own, as a ViT's class token

    def reset_parameters(self) -> None:
        """Reaches past its children (the replay's copy has only those): the token takes the fallback."""
        nn.init.zeros_(self.token)
        nn.init.zeros_(self.net[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build() -> nn.Module:
    return Mixed()


def reads_its_weights(num_classes: int) -> nn.Module:
    """A user's model whose constructor reads a parameter's value (the meta device has none)."""
    model = nn.Linear(4, num_classes)
    model.weight.data /= model.weight.abs().max().item()
    return model


def sharded(scheme: str, weights: str | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with deferred.parameters_on_meta() as later:
        model = build()
    later.scheme = scheme
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    later.materialise(model, torch.device("cpu"))
    if weights:
        load_weights(model, read_weight_file(Path(weights), mapped=True), weights, into_shards=True)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    cases = {"default": sharded("default", None), "kaiming": sharded("kaiming", None),
             **{f"weights{suffix}": sharded("default", sys.argv[2] + suffix) for suffix in (".pt", ".safetensors")}}
    if dist.get_rank() == 0:
        torch.save(cases, sys.argv[1])
    dist.destroy_process_group()
