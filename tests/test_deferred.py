"""Deferred initialisation under FSDP2 (``trainer/models/deferred.py``): a model built without its
parameters' memory and given its values shard by shard starts where a one-process build starts,
on 2 processes (uneven shards, an empty one), from its layers' resets, ``model.init`` or ``model.weights``."""

from __future__ import annotations


import pytest
import torch
from deferred_build import build
from helpers import TESTS, child_env, run
from safetensors.torch import save_file

from trainer import config, models
from trainer.models import initialise


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("deferred")
    torch.manual_seed(7)
    weights = build().state_dict()
    torch.save(weights, tmp / "weights.pt")
    save_file({key: tensor.contiguous() for key, tensor in weights.items()}, tmp / "weights.safetensors")
    result = run([str(tmp / "cases.pt"), str(tmp / "weights")], nproc=2, script=TESTS / "deferred_build.py",
                 env=child_env(PYTHONPATH=f"{TESTS.parent}:{TESTS}"))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"file": weights, **torch.load(tmp / "cases.pt", weights_only=True)}


def one_process(scheme: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build()
    initialise(model, scheme)
    return model.state_dict()


def assert_equal(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], but: str = "") -> None:
    assert mine.keys() == theirs.keys()
    differ = [key for key in mine if key != but and not torch.equal(mine[key], theirs[key])]
    assert not differ, f"{differ} differ"


@pytest.mark.parametrize("scheme", ["default", "kaiming"])
def test_the_shards_start_as_a_one_process_build(cases: dict, scheme: str) -> None:
    """Layers' resets (the attention's, which also zeroes its child's bias, included), BatchNorm's
    statistics and ``model.init``, bitwise; the parameter no reset covers gets the fallback."""
    assert_equal(cases[scheme], one_process(scheme), but="token")
    token = cases[scheme]["token"]
    assert token.abs().max() <= 0.04 and 0.01 < token.std() < 0.03


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_are_read_each_rank_its_slices(cases: dict, suffix: str) -> None:
    assert_equal(cases[f"weights{suffix}"], cases["file"])


def test_the_build_holds_no_parameter_memory_but_real_buffers() -> None:
    model, materialise = models.build_deferred(config.load(overrides=["model.name=smallcnn"]), 3)
    assert materialise is not None and all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers()) and torch.equal(model[1].running_var, torch.ones(32))


def test_a_constructor_that_reads_its_parameters_is_built_whole_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.load(overrides=["model.name=deferred_build:reads_its_weights"])
    model, materialise = models.build_deferred(cfg, 3)
    assert materialise is None and not model.weight.is_meta and model.weight.abs().max() == 1
    assert "cannot be built without its parameters' memory (Tensor.item() cannot be called on meta" in caplog.text


def test_a_torchvision_constructors_own_initialisation_is_named_as_not_replayed(
        caplog: pytest.LogCaptureFixture) -> None:
    """torchvision's ResNet initialises its convolutions in its constructor: a deferred build says
    its layers start from PyTorch's defaults and how to get the constructor's values; a model that
    leaves its initialisation to its layers says nothing."""
    for name in ("resnet18", "smallcnn"):
        caplog.clear()
        model, materialise = models.build_deferred(config.load(overrides=[f"model.name={name}"]), 3)
        materialise(model, torch.device("cpu"))
        assert all(not p.is_meta for p in model.parameters())
        said = "its constructor initialises its layers itself" in caplog.text
        assert said == (name == "resnet18") and ("give it as model.weights" in caplog.text) == said, name
