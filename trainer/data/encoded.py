"""The loader workers' half of decoding on the device (``data.decode=gpu``): a sample leaves the
worker as its encoded JPEG bytes and the geometry to cut from it, not as pixels.

The geometry is drawn from the torch RNG exactly as the CPU transform draws it (the same calls in
the same order: :class:`trainer.data.decode.ResizedCrop`'s box, then the flip), from the header
alone (PIL opens files lazily), so a sample gets the same box and flip whichever side decodes it.
With an augmentation policy, the RNG state after those draws travels too: the policy continues
the sample's stream on the device (:mod:`trainer.data.device_decode`).

A file the device decoder may not take (not a JPEG, a CMYK or grayscale JPEG, an image without a
file behind it) goes the CPU way in the worker, from the same seeded stream: its pixels travel as
today and are counted as decoded on the CPU.
"""

from __future__ import annotations

import io
from typing import Any, Callable, NamedTuple

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import functional as F

from trainer.data.decode import ResizedCrop
from trainer.data.stages import Batch

DEVICE_MODES = ("RGB",)
"""PIL modes of the JPEGs sent to the device decoder: nvjpeg knows no CMYK (nor YCCK) subsampling;
grayscale stays on the CPU too (rare, and one case fewer to check on each nvjpeg version)."""


class Plan(NamedTuple):
    """Where one sample's pixels come from: ``box`` of the decoded image resized to ``size``, then
    ``crop`` of that, then flipped or not. All (top, left, height, width) or (height, width)."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool

    def row(self) -> list[int]:
        return [*self.box, *self.size, *self.crop, int(self.flip)]

    @classmethod
    def from_row(cls, row: list[int]) -> Plan:
        return cls(tuple(row[0:4]), tuple(row[4:6]), tuple(row[6:10]), bool(row[10]))  # type: ignore[arg-type]


class Encoded(NamedTuple):
    """One sample as a worker hands it over for device decoding."""

    data: torch.Tensor
    """The file's bytes (uint8)."""
    plan: Plan
    rng: torch.Tensor | None
    """The torch RNG state after the geometry's draws (only with a policy to run on the device)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the decoded sample: (3, H, W)."""
        return 3, self.plan.crop[2], self.plan.crop[3]


class RandomBox:
    """The training geometry with random resized crops: the crop's draws, then the flip's."""

    def __init__(self, crop: ResizedCrop, hflip: bool) -> None:
        self.crop, self.hflip = crop, hflip

    def __call__(self, image: Image.Image) -> Plan:
        top, left, height, width = self.crop.box(image)
        side = self.crop.size
        return Plan((top, left, height, width), (side, side), (0, 0, side, side), _flip(self.hflip))


class ResizeCentre:
    """Resize the shorter side, centre-crop (torchvision's ``Resize`` + ``CenterCrop`` geometry), then
    the flip's draw; None (before any draw) where ``CenterCrop`` would pad."""

    def __init__(self, resize: int, crop: int, hflip: bool) -> None:
        self.resize, self.crop, self.hflip = resize, crop, hflip

    def __call__(self, image: Image.Image) -> Plan | None:
        width, height = image.size
        resized_height, resized_width = F._compute_resized_output_size((height, width), [self.resize])
        if min(resized_height, resized_width) < self.crop:
            return None
        top = int(round((resized_height - self.crop) / 2.0))
        left = int(round((resized_width - self.crop) / 2.0))
        return Plan((0, 0, height, width), (resized_height, resized_width), (top, left, self.crop, self.crop),
                    _flip(self.hflip))


def _flip(hflip: bool) -> bool:
    """``RandomHorizontalFlip``'s draw, made only when the flip is on (as the CPU transform)."""
    return hflip and bool(torch.rand(1) < 0.5)


def encoded_bytes(image: Any) -> torch.Tensor | None:
    """The file bytes of a lazily opened JPEG the device decoder takes, else None (no RNG draw)."""
    if not isinstance(image, Image.Image) or image.format != "JPEG" or image.mode not in DEVICE_MODES:
        return None
    source = getattr(image, "fp", None)
    if isinstance(source, io.BytesIO):
        data = source.getvalue()
    elif getattr(image, "filename", ""):
        with open(image.filename, "rb") as file:
            data = file.read()
    else:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EncodedTransform:
    """In a loader worker: a device-decodable JPEG as :class:`Encoded`, anything else through
    ``cpu`` (the CPU transform), both from the same seeded RNG stream."""

    def __init__(self, geometry: Callable[[Image.Image], Plan | None], cpu: Callable[[Any], torch.Tensor],
                 keep_rng: bool) -> None:
        self.geometry, self.cpu, self.keep_rng = geometry, cpu, keep_rng

    def __call__(self, image: Any) -> Encoded | torch.Tensor:
        data = encoded_bytes(image)
        plan = self.geometry(image) if data is not None else None
        if plan is None:
            return self.cpu(image)
        image.close()  # its pixels are not needed here (the CPU transform's decode would close it)
        return Encoded(data, plan, torch.get_rng_state() if self.keep_rng else None)


class EncodedImages(NamedTuple):
    """A batch's images as loaded with ``data.decode=gpu``: the encoded files (concatenated) with
    their plans at positions ``at``, and the samples decoded in the workers at ``ready_at``."""

    data: torch.Tensor
    offsets: torch.Tensor
    """int64, one more than the files: file j is ``data[offsets[j]:offsets[j + 1]]``."""
    plans: torch.Tensor
    """int64 (files, 11): :meth:`Plan.row` of each file."""
    rng: torch.Tensor | None
    at: torch.Tensor
    ready: torch.Tensor
    """uint8 (samples, 3, H, W): pixels the workers decoded (CPU fallback)."""
    ready_at: torch.Tensor

    def __len__(self) -> int:
        return len(self.at) + len(self.ready_at)

    def files(self) -> list[torch.Tensor]:
        bounds = self.offsets.tolist()
        return [self.data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

    def pin_memory(self) -> EncodedImages:
        """The DataLoader's pinning thread: only the pixels are copied to the device as they are."""
        return self._replace(ready=self.ready.pin_memory())


def collate_encoded(good: list[tuple[Any, Any, int, int]], skipped: int) -> Batch:
    """A batch with :class:`EncodedImages` as its images (``good``: readable samples, some encoded)."""
    encoded = [(position, sample[0]) for position, sample in enumerate(good) if isinstance(sample[0], Encoded)]
    ready = [(position, sample[0]) for position, sample in enumerate(good) if not isinstance(sample[0], Encoded)]
    sizes = torch.tensor([0] + [len(item.data) for _, item in encoded], dtype=torch.int64)
    states = [item.rng for _, item in encoded]
    images = EncodedImages(
        data=torch.cat([item.data for _, item in encoded]),
        offsets=sizes.cumsum(0),
        plans=torch.tensor([item.plan.row() for _, item in encoded], dtype=torch.int64),
        rng=torch.stack(states) if states[0] is not None else None,  # type: ignore[arg-type]
        at=torch.tensor([position for position, _ in encoded], dtype=torch.int64),
        ready=torch.stack([image for _, image in ready]) if ready else torch.empty(0, dtype=torch.uint8),
        ready_at=torch.tensor([position for position, _ in ready], dtype=torch.int64))
    _, targets, indices, repeats = default_collate([(0, *sample[1:]) for sample in good])
    return Batch(images, targets, skipped, indices, repeats)  # type: ignore[arg-type]
