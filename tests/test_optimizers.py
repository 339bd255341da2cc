"""LAMB, LARS and Lion (timm's), the one-line error without timm, and stochastic depth
(model.drop_path) passed to the torchvision and timm constructors that take it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import run, small_run
from test_tasks import in_process_worker

from trainer import config, models
from trainer.config import OptimConfig
from trainer.errors import ConfigError
from trainer.train import optim


def fit_a_line(name: str, lr: float, steps: int = 30) -> tuple[torch.optim.Optimizer, float, float]:
    """A few full-batch steps of least squares; the optimizer and the loss before and after."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    cfg = OptimConfig(name=name, lr=lr, lr_base_batch=0, betas=[0.9, 0.99], weight_decay=0.0)
    optimizer = optim.build_optimizer(model, cfg, torch.device("cpu"))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer, losses[0], losses[-1]


@pytest.mark.parametrize(("name", "cls", "lr"), [("lamb", "Lamb", 0.05), ("lars", "Lars", 0.05),
                                                 ("lion", "Lion", 0.05)])
def test_timm_optimizers_by_name_descend(name: str, cls: str, lr: float) -> None:
    optimizer, first, last = fit_a_line(name, lr)
    assert type(optimizer).__name__ == cls and type(optimizer).__module__.startswith("timm.optim")
    assert last < 0.5 * first


def test_without_timm_the_optimizer_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives: ImportError
    with pytest.raises(ConfigError, match=r"^optim.name=lion: timm is not installed; pip install "
                                          r"'torch-launchpad\[timm\]'$"):
        optim.build_optimizer(torch.nn.Linear(2, 1), OptimConfig(name="lion"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^optim.name=lamb: timm is not installed"):  # at start-up
        optim.check_available(OptimConfig(name="lamb"))
    optim.check_available(OptimConfig(name="sgd"))


def test_a_run_with_lamb_trains_at_the_square_root_scaled_rate(tmp_path: Path) -> None:
    worker = in_process_worker(small_run(tmp_path, "log.name=lamb", "optim.name=lamb", "optim.lr=0.004",
                                         "model.name=linear", "train.epochs=2", "log.pictures=false"))
    assert type(worker.optimizer).__name__ == "Lamb"
    assert worker.peak.value == pytest.approx(0.004 * (8 / 256) ** 0.5)  # auto: sqrt for LAMB, as timm
    assert worker.fit() == 0
    history = worker.record.history
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def drop_rates(model: torch.nn.Module) -> list[float]:
    """Every stochastic depth module's rate (torchvision's StochasticDepth.p, timm's DropPath.drop_prob)."""
    return [float(getattr(m, "p", getattr(m, "drop_prob", 0.0))) for m in model.modules()
            if type(m).__name__ in ("StochasticDepth", "DropPath")]


def test_drop_path_reaches_torchvision_and_timm_models() -> None:
    def built(*overrides: str) -> torch.nn.Module:
        return models.build_for_training(config.load([], ["data.image_size=32", *overrides]), 3)

    torchvision_rates = drop_rates(built("model.name=convnext_tiny", "model.drop_path=0.3"))
    assert max(torchvision_rates) == pytest.approx(0.3)  # the last block's, rising linearly from 0
    assert max(drop_rates(built("model.name=convnext_tiny"))) == pytest.approx(0.1)  # unset: torchvision's own
    timm_rates = drop_rates(built("model.name=timm:resnet18", "model.drop_path=0.2"))
    assert timm_rates and max(timm_rates) == pytest.approx(0.2)
    for name in ("resnet18", "smallcnn"):
        with pytest.raises(ConfigError, match=f"model.drop_path: .*{name}"):
            built(f"model.name={name}", "model.drop_path=0.1")
    with pytest.raises(ConfigError, match=r"model.drop_path: a rate in \[0, 1\)"):
        config.load([], ["model.drop_path=1.5"])


@pytest.mark.parametrize("name", ["vit_b_16", "timm:vit_tiny_patch16_224"])
def test_layer_decay_gives_each_vit_block_its_rate(name: str) -> None:
    cfg = config.load([], [f"model.name={name}", "data.image_size=32", "optim.layer_decay=0.5", "optim.lr=1",
                           "optim.lr_base_batch=0"])
    model = models.build_for_training(cfg, 3)
    optimizer = optim.build_optimizer(model, cfg.optim, torch.device("cpu"))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    blocks = 12
    first_block = "blocks.0.norm1.weight" if name.startswith("timm:") else "encoder.layers.encoder_layer_0.ln_1.weight"
    last_block = first_block.replace("0", str(blocks - 1), 1)
    embedding = "patch_embed.proj.weight" if name.startswith("timm:") else "conv_proj.weight"
    head = "head.weight" if name.startswith("timm:") else "heads.head.weight"
    assert rate[id(named[head])] == 1.0 and rate[id(named[last_block])] == 0.5
    assert rate[id(named[first_block])] == 0.5 ** blocks and rate[id(named[embedding])] == 0.5 ** (blocks + 1)
    assert optimizer.param_groups[0]["lr"] == 1.0  # the logged rate is the full one
    with pytest.raises(ConfigError, match="optim.layer_decay: the model has no ViT blocks"):
        optim.build_optimizer(torch.nn.Linear(2, 1), cfg.optim, torch.device("cpu"))


@pytest.mark.parametrize(("options", "message"), [
    (["model.name=resnet50", "model.drop_path=0.05"],
     "error: model.drop_path: resnet50 has no stochastic depth (ResNet.__init__() got an unexpected keyword "
     "argument 'stochastic_depth_prob'); leave it unset (null)"),
    (["model.name=resnet18", "optim.layer_decay=0.65"],
     "error: optim.layer_decay: the model has no ViT blocks (timm's blocks.<i>, torchvision's "
     "encoder.layers.encoder_layer_<i>); set optim.layer_decay=1"),
])
def test_model_options_the_model_cannot_take_are_refused_before_any_work(tmp_path: Path, options: list[str],
                                                                         message: str) -> None:
    """Found on the model built on the meta device at start-up: no data read, no run directory made."""
    done = run(small_run(tmp_path, *options, f"data.root={tmp_path / 'nowhere'}", "data.source=imagefolder"))
    assert (done.returncode, done.stderr.strip()) == (2, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
