"""The recipe files (configs/recipes/) run end to end on 2 gloo processes, scaled down only by
overrides of the data's source and sizes, the epochs and the model, and the resolved config in the
run directory holds every key the recipe sets with the recipe's value."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from helpers import REPO, run, run_dir, small_run

from trainer.config import flatten

RECIPES = REPO / "configs" / "recipes"

SCALED_DOWN = ("data.source=synthetic", "train.epochs=1", "data.train_crop_size=12", "data.val_resize_size=18",
               "data.val_crop_size=16", "log.pictures=false")
"""What every run overrides besides :func:`helpers.small_run`'s sizes: a generated set, one epoch,
tiny crops (the augmentations, mixing and repeats stay on)."""


@dataclass(frozen=True)
class Recipe:
    file: str
    model: tuple[str, ...]  # the model override: a small one of the same family
    rate: str  # how the start-up line must say the peak rate was scaled to the global batch of 2 x 8


CASES = {
    "torchvision-v2": Recipe("resnet50-torchvision-v2.yaml", ("model.name=resnet18",), "optim.lr 0.5 x 16/1024,"),
    "timm-a3": Recipe("resnet50-timm-a3.yaml", ("model.name=timm:resnet10t",), "optim.lr 0.008 x sqrt(16/2048),"),
    "finetune-small": Recipe("finetune-small.yaml", ("model.name=resnet18",), "optim.lr 0.0005 x sqrt(16/256),"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], str]]:
    """Each recipe once under torchrun with 2 processes: its run directory, overrides and output."""
    tmp = tmp_path_factory.mktemp("recipes")
    weights = tmp / "resnet18_imagenet_shaped.pt"  # stands in for IMAGENET1K_V2: same names, a 1000-class head
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    results = {}
    for name, recipe in CASES.items():
        model = (*recipe.model, f"model.weights={weights}") if name == "finetune-small" else recipe.model
        overrides = small_run(tmp, f"log.name={name}", *SCALED_DOWN, *model, train_per_class=24, val_per_class=8)
        done = run(["-c", str(RECIPES / recipe.file), *overrides], nproc=2, timeout=240)
        assert done.returncode == 0, f"{recipe.file}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        results[name] = (run_dir(tmp, name), overrides, done.stdout + done.stderr)
    return results


def recipe_keys(file: str) -> dict[str, object]:
    return flatten(yaml.safe_load((RECIPES / file).read_text()))


@pytest.mark.parametrize("name", CASES)
def test_the_resolved_config_holds_every_key_of_the_recipe(name: str, runs: dict) -> None:
    directory, overrides, _ = runs[name]
    overridden = {item.partition("=")[0] for item in overrides}
    resolved = flatten(yaml.safe_load((directory / "config.yaml").read_text()))
    expected = {key: value for key, value in recipe_keys(CASES[name].file).items() if key not in overridden}
    assert len(expected) >= 12, "the recipe lost its keys"
    assert {key: resolved.get(key, "<missing>") for key in expected} == expected


@pytest.mark.parametrize("name", CASES)
def test_the_recipe_trains_at_its_rate_scaled_to_the_run_and_validates(name: str, runs: dict) -> None:
    directory, _, output = runs[name]
    assert CASES[name].rate in output
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    averaged = recipe_keys(CASES[name].file).get("train.ema_decay", 0) > 0
    assert metrics and all("val/top1" in record and ("val_ema/top1" in record) == averaged for record in metrics)


def test_finetuning_loads_the_weights_and_replaces_only_the_head(runs: dict) -> None:
    output = runs["finetune-small"][2]
    assert "2 replaced (shape differs: fc.bias, fc.weight), 0 missing, 0 unused" in output


def test_every_recipe_file_is_tested() -> None:
    assert sorted(path.name for path in RECIPES.glob("*.yaml")) == sorted(recipe.file for recipe in CASES.values())
