"""Building models by name, the init schemes, and unwrapping DDP / torch.compile wrappers."""

from __future__ import annotations

import math
import socket
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import models
from trainer.errors import ConfigError


def forward_shape(model: nn.Module, image_size: int, batch: int = 2) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(batch, 3, image_size, image_size)).shape)


@pytest.mark.parametrize(("name", "image_size"), [
    ("smallcnn", 32), ("linear", 16), ("resnet18", 32), ("mobilenet_v3_small", 64),
])
def test_builds_with_requested_classes_and_forwards(name: str, image_size: int) -> None:
    model = models.build_model(name, num_classes=7, image_size=image_size)
    assert forward_shape(model, image_size, batch=3) == (3, 7)


def test_names_match_case_insensitively() -> None:
    assert models.resolve_name("ResNet18") == "resnet18"
    assert models.resolve_name("SmallCNN") == "smallcnn"
    model = models.build_model("ResNet18", num_classes=4, image_size=32)
    assert model.fc.out_features == 4


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet1000'; did you mean resnet101\b"):
        models.resolve_name("resnet1000")
    with pytest.raises(ConfigError, match="did you mean smallcnn"):
        models.build_model("smalcnn", num_classes=3, image_size=32)


def test_unknown_name_without_close_match_gives_examples() -> None:
    with pytest.raises(ConfigError, match="e.g. smallcnn"):
        models.resolve_name("qqqqqqqq")


# --- init schemes ----------------------------------------------------------------------------------

def seeded_smallcnn(init: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = models.build_model("smallcnn", num_classes=10, image_size=32, init=init)
    assert isinstance(model, nn.Sequential)
    return model


def test_default_init_keeps_pytorch_init_and_is_seeded() -> None:
    a, b = seeded_smallcnn("default"), seeded_smallcnn("default")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    head = a[-1]
    assert isinstance(head, nn.Linear) and head.bias.abs().sum() > 0


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_init_scheme_changes_weights_and_zeroes_biases(scheme: str) -> None:
    default, changed = seeded_smallcnn("default"), seeded_smallcnn(scheme)
    layers = [(d, c) for d, c in zip(default.modules(), changed.modules()) if isinstance(c, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 5
    for d, c in layers:
        assert not torch.equal(d.weight, c.weight)
        if c.bias is not None:
            assert torch.count_nonzero(c.bias) == 0


def test_init_schemes_follow_their_distributions() -> None:
    # The 256x128x3x3 conv has enough weights to estimate the spread within a few percent.
    conv = [m for m in seeded_smallcnn("kaiming").modules() if isinstance(m, nn.Conv2d)][-1]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)

    conv = [m for m in seeded_smallcnn("xavier").modules() if isinstance(m, nn.Conv2d)][-1]
    fan_in = conv.in_channels * 9
    bound = math.sqrt(6 / (fan_in + conv.out_channels * 9))
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_init_scheme_resets_norm_layers(scheme: str) -> None:
    model = seeded_smallcnn("default")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(2, 3)
            bn.bias.uniform_(2, 3)
    models.initialise(model, scheme)
    assert len(norms) == 4
    for bn in norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.count_nonzero(bn.bias) == 0


def test_unknown_init_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.init"):
        models.initialise(models.build_model("linear", 2, 8), "orthogonal")


# --- unwrap ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gloo_group() -> Iterator[None]:
    """A real single-process gloo process group, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unwrap_plain_model_is_itself() -> None:
    model = models.build_model("linear", 3, 8)
    assert models.unwrap(model) is model


def test_unwrap_strips_torch_compile() -> None:
    model = models.build_model("linear", 3, 8)
    compiled = torch.compile(model)
    assert compiled is not model
    assert models.unwrap(compiled) is model


def test_unwrap_strips_ddp_and_compile_nested(gloo_group: None) -> None:
    model = models.build_model("smallcnn", 3, 32)
    ddp = DistributedDataParallel(model)
    assert models.unwrap(ddp) is model
    assert models.unwrap(DistributedDataParallel(torch.compile(model))) is model
    assert set(models.unwrap(ddp).state_dict()) == set(model.state_dict())  # no "module." prefixes
