"""Start-up child, hand-written side: the plainest script that takes the Worker's first step.

Same data folder, transforms, batch, DataLoader workers, model, optimizer and loss as
``python -m trainer`` with the start-up case's overrides; no trainer code. Prints
``MARK first_step <time.time()>`` right after the first ``optimizer.step()``.
"""

import sys
import time

print(f"MARK python_up {time.time():.6f} {time.process_time():.6f}", flush=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

print(f"MARK imports {time.time():.6f} {time.process_time():.6f}", flush=True)


def main(root: str, image_size: int, batch: int, workers: int) -> None:
    torch.manual_seed(0)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
    train = datasets.ImageFolder(root, transform=transform)
    loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, len(train.classes)))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.05, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    print(f"MARK built {time.time():.6f} {time.process_time():.6f}", flush=True)
    for images, targets in loader:
        loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"MARK first_step {time.time():.6f} {time.process_time():.6f}", flush=True)
        break


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
