"""Your own model, data and weights: a user package written here, on ``--code``, trains, stops,
resumes bitwise, evaluates and predicts under 1 and 2 processes; fine-tuning from a weights file
beats training from scratch; torchvision weights offline and bad import paths are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trainer import config, models
from trainer.config import user_code
from trainer.errors import ConfigError
from trainer.models import weights
from trainer.tools.evaluate import main as evaluate_main
from trainer.tools.predict import main as predict_main
from trainer.train import optim

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(num_classes, image_size):
    assert image_size == 16, image_size
    return TinyNet(num_classes)


def not_a_model(num_classes):
    return "a string"
'''

DATA = '''
import os
import signal

import torch
from torch.utils.data import Dataset

READS = 0


class ColourBlobs(Dataset):
    """Class c: noise with channel c brighter. The noise comes from torch's global RNG, which the
    trainer seeds per (seed, epoch, index): exact resume holds for it too."""

    def __init__(self, size, image_size, brightness=1.0):
        self.size, self.image_size, self.brightness = size, image_size, brightness

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        global READS
        READS += 1
        if READS == int(os.environ.get("SIGTERM_AT_READ", "0")) and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)  # a real stop signal, at a known point of the run
        image = torch.randn(3, self.image_size, self.image_size) * 0.5
        image[index % 3] += self.brightness
        return image, index % 3


def build(cfg):
    return ColourBlobs(96, cfg.image_size), ColourBlobs(30, cfg.image_size), ["red", "green", "blue"]


def recoloured(cfg):
    """The same task in a new look (dimmer colours)."""
    return ColourBlobs(96, cfg.image_size, 0.6), ColourBlobs(60, cfg.image_size, 0.6), ["red", "green", "blue"]
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project: ``src/mypkg`` with its own nn.Module and Dataset, plus three PNG images."""
    root = tmp_path_factory.mktemp("user")
    package = root / "src" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    (package / "data.py").write_text(DATA)
    (package / "broken.py").write_text("def build(num_classes:\n")
    for channel, name in enumerate(("red", "green", "blue")):
        pixels = np.full((16, 16, 3), 60, np.uint8)
        pixels[..., channel] = 200
        Image.fromarray(pixels).save(root / f"{name}.png")
    return root / "src"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRAINER_DEBUG") and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run(cwd: Path, module: str, *args: str, processes: int = 1, **env: str) -> subprocess.CompletedProcess[str]:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    return subprocess.run([*launcher, "-m", module, *args], cwd=cwd, env=child_env(**env), capture_output=True,
                          text=True, timeout=300)


def train_args(code: Path, name: str, *extra: str) -> list[str]:
    return ["--code", str(code), "--model", "mypkg.nets:build", "--data.source", "mypkg.data:build",
            "--epochs", "2", "--batch-size", "8", "--workers", "0", "--name", name, "data.image_size=16",
            "log.output_dir=runs", "log.progress_bar=off", "ckpt.every_steps=3", "dist.timeout_s=60", *extra]


def last_state(cwd: Path, name: str) -> dict:
    return torch.load(cwd / "runs" / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_user_package_trains_stops_resumes_evaluates_predicts(code_dir: Path, tmp_path: Path, processes: int,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cwd = tmp_path  # not the package's folder: only --code puts it on sys.path
    reference = run(cwd, "trainer", *train_args(code_dir, "whole"), processes=processes)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = last_state(cwd, "whole")
    assert expected["config"]["model"]["name"] == "mypkg.nets:build"
    assert expected["config"]["data"]["source"] == "mypkg.data:build"

    stopped = run(cwd, "trainer", *train_args(code_dir, "cut"), processes=processes, SIGTERM_AT_READ="20")
    assert stopped.returncode != 0 and "checkpoint saved, exit code 3" in stopped.stdout + stopped.stderr
    assert 0 < last_state(cwd, "cut")["global_step"] < expected["global_step"]
    resumed = run(cwd, "trainer", *train_args(code_dir, "cut"), processes=processes)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    final = last_state(cwd, "cut")
    assert final["global_step"] == expected["global_step"]
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    assert [r["val/top1"] for r in final["history"]] == [r["val/top1"] for r in expected["history"]]

    ckpt = cwd / "runs" / "cut" / "checkpoints" / "last.pt"
    if processes == 2:
        evaluated = run(cwd, "trainer.evaluate", "--code", str(code_dir), str(ckpt), processes=processes)
        assert evaluated.returncode == 0, evaluated.stderr
        output = evaluated.stdout
    else:  # in this process: the same code path, without another interpreter start
        capsys.readouterr()
        assert evaluate_main(["--code", str(code_dir), str(ckpt), "data.num_workers=0"]) == 0
        output = capsys.readouterr().out
    metrics = json.loads(output.strip().splitlines()[-1])
    assert metrics["samples"] == 30 and metrics["top1"] == final["history"][-1]["val/top1"]

    images = sorted(str(p) for p in code_dir.parent.glob("*.png"))
    assert predict_main(["--code", str(code_dir), str(ckpt), *images]) == 0  # the CPU predictor: one process
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images
    assert all(line.split("\t")[1].split()[0] in ("red", "green", "blue") for line in lines)


@pytest.mark.slow
def test_fine_tuning_from_a_weights_file_beats_scratch(code_dir: Path, tmp_path: Path) -> None:
    """resnet18 learns the colour task, then one epoch on a recoloured variant at a learning rate too
    small to learn it from scratch: only weights that really reached the model can score."""
    common = ["--code", str(code_dir), "--model", "resnet18", "data.image_size=16", "--batch-size", "16",
              "--workers", "0", "log.output_dir=runs", "log.progress_bar=off", "sched.warmup_epochs=0",
              "optim.lr_base_batch=0"]  # the rates below are the rates
    pretrain = run(tmp_path, "trainer", *common, "data.source=mypkg.data:build", "--epochs", "2", "--name", "pre",
                   "optim.name=adamw", "--lr", "0.002")
    assert pretrain.returncode == 0, pretrain.stderr
    weights = tmp_path / "pre.pt"
    torch.save(last_state(tmp_path, "pre")["model"], weights)  # a plain state dict, as users have them
    top1 = {}
    for name, extra in (("finetuned", ["--weights", str(weights)]), ("scratch", [])):
        result = run(tmp_path, "trainer", *common, "data.source=mypkg.data:recoloured", "--epochs", "1",
                     "--name", name, "--lr", "0.0001", *extra)
        assert result.returncode == 0, result.stderr
        top1[name] = last_state(tmp_path, name)["history"][-1]["val/top1"]
        if extra:
            assert "122 tensors loaded, 0 replaced, 0 missing, 0 unused" in result.stdout
    assert top1["finetuned"] > top1["scratch"] + 0.2, top1


def test_torchvision_weights_offline_name_the_file_to_put_in_torch_home(tmp_path: Path) -> None:
    torch_home = tmp_path / "torch-home"
    closed_proxy = "http://127.0.0.1:9"  # the discard port: nothing listens, as on a node without network
    result = run(tmp_path, "trainer", "--model", "resnet18", "--weights", "DEFAULT", "log.output_dir=runs",
                 f"data.cache_dir={tmp_path / 'cache'}",
                 TORCH_HOME=str(torch_home), https_proxy=closed_proxy, HTTPS_PROXY=closed_proxy, no_proxy="",
                 NO_PROXY="")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"model.weights: {expected} is missing" in lines[0]
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # refused before any work


def test_timm_model_trains_one_epoch(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="the timm extra is not installed (CI installs it)")
    result = run(tmp_path, "trainer", "--model", "timm:resnet10t", "--epochs", "1", "--batch-size", "8",
                 "--workers", "0", "data.synthetic_classes=2", "data.synthetic_train_per_class=16",
                 "data.synthetic_val_per_class=4", "data.image_size=32", f"data.cache_dir={tmp_path / 'cache'}",
                 "log.output_dir=runs", "log.progress_bar=off")
    assert result.returncode == 0, result.stderr
    state = last_state(tmp_path, "default")
    assert state["config"]["model"]["name"] == "timm:resnet10t" and state["epoch"] == 1
    assert state["model"]["fc.weight"].shape[0] == 2


@pytest.mark.parametrize(("key", "spec", "expected"), [
    ("model.name", "mypkg.absent:build", "model.name: cannot import 'mypkg.absent' (no module named 'mypkg.absent'); "
                                         "run from the folder that holds it or pass --code DIR"),
    ("model.name", "mypkg.nets:biuld", "model.name: 'mypkg.nets' has no attribute 'biuld'; did you mean 'build'?"),
    ("model.name", "mypkg.broken:build", "model.name: importing 'mypkg.broken' failed: SyntaxError:"),
    ("data.source", "mypkg.nets:TinyNet.missing", "data.source: 'mypkg.nets' has no attribute 'TinyNet.missing'"),
    ("data.source", "mypkg.data:READS", "data.source: 'mypkg.data:READS' is a int, not a function or class"),
    ("model.name", "my-pkg:build", "model.name: 'my-pkg:build' is not an import path"),
])
def test_each_bad_import_path_is_one_line(code_dir: Path, key: str, spec: str, expected: str) -> None:
    user_code.add_code_dirs([code_dir])
    with pytest.raises(ConfigError) as error:
        user_code.load_callable(spec, key)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_builder_returning_no_module_is_one_line_exit_2_before_any_work(code_dir: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "trainer", "--code", str(code_dir), "--model", "mypkg.nets:not_a_model",
                 "data.source=mypkg.data:build", "data.image_size=16", "log.output_dir=runs")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: model.name: mypkg.nets:not_a_model(num_classes=...) returned str, "
                                     "not a torch.nn.Module; return the network itself")
    assert not list((tmp_path / "runs").rglob("*.pt"))


# --- weights and fine-tuning, in process ------------------------------------------------------------

def test_weights_file_with_other_classes_replaces_the_head_and_reports_keys(tmp_path: Path) -> None:
    source = models.build_model("resnet18", num_classes=10, image_size=32)
    path = tmp_path / "ten.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # a DDP-saved state dict
    cfg = config.load(overrides=["model.name=resnet18", f"model.weights={path}"])
    torch.manual_seed(0)
    model = models.build_for_training(cfg, num_classes=3)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (3, 512)
    line = weights.load_weights(models.build_model("resnet18", 3, 32), weights.read_weight_file(path), str(path))
    assert line == f"model.weights={path}: 120 tensors loaded, 2 replaced (shape differs: fc.bias, fc.weight), " \
                   "0 missing, 0 unused"


def test_weights_that_match_nothing_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ConfigError, match="no tensor of .* matches the model"):
        weights.load_weights(models.build_model("smallcnn", 3, 32), weights.read_weight_file(path), str(path))


def test_torchvision_weights_imply_their_normalisation_unless_the_config_sets_it() -> None:
    implied = config.load(overrides=["model.name=resnet18", "model.weights=DEFAULT"],
                          implied=models.implied_settings)
    assert implied.data.mean == [0.485, 0.456, 0.406] and implied.data.image_size == 224
    assert implied.data.val_crop_fraction == pytest.approx(224 / 256)
    own = config.load(overrides=["model.name=resnet18", "model.weights=DEFAULT", "data.image_size=64",
                                 "data.mean=[0.1,0.2,0.3]"], implied=models.implied_settings)
    assert own.data.mean == [0.1, 0.2, 0.3] and own.data.image_size == 64
    assert own.data.std == [0.229, 0.224, 0.225]
    with pytest.raises(ConfigError, match="'IMAGENET9' is not a weights name of resnet18 nor a file; use one of "
                                          "DEFAULT, IMAGENET1K_V1"):
        config.load(overrides=["model.name=resnet18", "model.weights=IMAGENET9"], implied=models.implied_settings)


def test_frozen_backbone_trains_only_the_head_and_head_lr_mult_scales_it() -> None:
    cfg = config.load(overrides=["model.name=smallcnn", "model.freeze=backbone", "optim.head_lr_mult=10"])
    model = models.build_for_training(cfg, num_classes=3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"17.weight", "17.bias"}
    head = models.head_parameter_names(model)
    optimizer = optim.build_optimizer(model, cfg.optim, torch.device("cpu"), head)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_backbone_frozen_for_some_epochs_has_zero_lr_until_then() -> None:
    cfg = config.load(overrides=["model.freeze=backbone", "train.freeze_epochs=1", "sched.name=constant",
                                 "sched.warmup_epochs=0"])
    model = models.build_for_training(cfg, num_classes=3)
    assert all(p.requires_grad for p in model.parameters())  # DDP fixes its parameter set once
    optimizer = optim.build_optimizer(model, cfg.optim, torch.device("cpu"), models.head_parameter_names(model))
    schedule = optim.Schedule(optimizer, cfg.sched, epochs=3, frozen_epochs=1)
    lrs = []
    for step in range(4):  # two steps per epoch
        schedule.set_window(step / 2, (step + 1) / 2)
        lrs.append([(g["head"], g["lr"]) for g in optimizer.param_groups])
    assert {lr for head, lr in lrs[0] + lrs[1] if not head} == {0.0}
    assert {lr for head, lr in lrs[2] + lrs[3]} == {0.1}


def test_torchvision_weights_come_from_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # what a download would have left
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    imagenet = models.build_model("resnet18", num_classes=1000, image_size=224)
    torch.save(imagenet.state_dict(), cached)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = config.load(overrides=["model.name=resnet18", "model.weights=IMAGENET1K_V1", "data.image_size=32"],
                      implied=models.implied_settings)
    models.check_weights(cfg.model)
    model = models.build_for_training(cfg, num_classes=5)
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 5


def test_one_of_our_checkpoints_as_weights_brings_its_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    saved_data = {"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.5, 0.5], "image_size": 48, "val_crop_fraction": 0.875}
    torch.save({"model": models.build_model("smallcnn", 3, 48).state_dict(), "config": {"data": saved_data}}, path)
    cfg = config.load(overrides=[f"model.weights={path}", "data.std=[0.1,0.1,0.1]"], implied=models.implied_settings)
    assert (cfg.data.mean, cfg.data.image_size, cfg.data.val_crop_fraction) == ([0.2, 0.3, 0.4], 48, 0.875)
    assert cfg.data.std == [0.1, 0.1, 0.1]  # set here: the config wins
