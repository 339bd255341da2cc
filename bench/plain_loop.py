"""The hand-written training loop every tutorial teaches, run as a user's own script would run.

    python bench/plain_loop.py ROOT --model resnet18 --image-size 64 --batch 64 --workers 2 --epochs 3
    torchrun --standalone --nproc_per_node=2 bench/plain_loop.py ROOT ...
    python bench/plain_loop.py --memory 10 64 ...   # random tensors in memory (bench/memory.py), no files

ImageFolder + DataLoader (RandomResizedCrop, flip, ToTensor, Normalize) + SGD + cross-entropy, with
DistributedSampler and DDP over gloo under torchrun. It imports neither ``trainer`` nor ``bench``
(``trainer`` chooses ``OMP_WAIT_POLICY`` at import: a baseline must run under the settings a user's
script gets); with ``--memory`` it takes its tensors from the sibling ``memory.py``, which imports
only torch. Rank 0 prints one ``PLAIN_RESULT {json}`` line: the model, its parameter count, the
samples trained per epoch and each epoch's training images/s (all ranks together), timed as the
Worker times its own (from asking the loader for its first batch to the last step's end).
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, models, transforms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="an ImageFolder: root/<class>/<image>")
    parser.add_argument("--memory", type=int, nargs=2, metavar=("CLASSES", "PER_CLASS"),
                        help="train on random tensors held in memory instead of ROOT (no transforms)")
    parser.add_argument("--model", default="resnet18", help="linear, or a torchvision classifier name")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="per process")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--crop-scale-min", type=float, default=0.35)
    parser.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    parser.add_argument("--std", type=float, nargs=3, default=[0.25, 0.25, 0.25])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per local rank)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the (DDP-wrapped) model")
    return parser.parse_args()


def build_model(name: str, image_size: int, classes: int) -> nn.Module:
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, classes))
    return models.get_model(name, weights=None, num_classes=classes)


def main() -> None:
    args = parse_args()
    distributed = "RANK" in os.environ
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if args.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(args.crop_scale_min, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(args.mean, args.std),
    ])
    if args.memory:
        from memory import LabelsAsInts, tensors  # bench/memory.py, beside this script

        classes = args.memory[0]
        train_set = LabelsAsInts(tensors(classes, args.memory[1], args.image_size, seed=0))
    else:
        train_set = datasets.ImageFolder(args.root, transform=transform)
        classes = len(train_set.classes)
    sampler = DistributedSampler(train_set) if distributed else None
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        pin_memory=device.type == "cuda")
    model = build_model(args.model, args.image_size, classes).to(device, memory_format=layout)
    parameters = sum(p.numel() for p in model.parameters())
    net = DistributedDataParallel(model) if distributed else model
    net = torch.compile(net) if args.compile else net
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss()
    rates, samples = [], 0
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        samples, start = 0, time.perf_counter()
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=layout)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = criterion(net(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(samples * world / (time.perf_counter() - start))
    if rank == 0:
        print("PLAIN_RESULT " + json.dumps({
            "model": args.model, "parameters": parameters, "samples_per_epoch": samples * world,
            "images_per_s": rates, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "root": args.root}), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
