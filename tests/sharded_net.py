"""A user's own model for the sharding tests: a stem, three residual ``Block``s with BatchNorm and
a head, small enough for CPU runs, with enough parameters per block that sharding shows."""

from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return (x + self.body(x)).relu()


def build(num_classes: int, width: int = 24) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         *(Block(width) for _ in range(3)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
