"""The main process's half of decoding on the device (``data.decode=gpu``): a batch of encoded
JPEGs (see :mod:`trainer.data.encoded`) becomes the uint8 batch the workers would have made.

One batched ``torchvision.io.decode_jpeg`` call decodes every file on the run's device (nvjpeg on
CUDA; libjpeg-turbo on the CPU, which is how the CPU tests run this path); each image is then cut
to its box, resized (bilinear, antialiased, as the CPU transform), centre-cropped and flipped as its
plan says, and the augmentation policy (if any) runs on it with the torch RNG where the worker
left it. A batch the decoder refuses is decoded file by file; a file that fails there is decoded by
PIL, and one PIL cannot read either is an unreadable sample (an error naming it, or dropped and
counted with ``data.on_bad_sample=skip``).
"""

from __future__ import annotations

import io
from typing import Callable, NamedTuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as F

from trainer.config import DataConfig
from trainer.data.encoded import EncodedImages, Plan
from trainer.data.stages import Batch
from trainer.errors import ConfigError, DataError

FILE_SOURCES = ("imagefolder", "prepared")
"""Sources whose samples are image files (JPEGs, usually): ``data.decode=auto`` decodes them on a GPU."""


def decodes_on_device(cfg: DataConfig, device: torch.device) -> bool:
    """``data.decode``: gpu always (on whatever device the run has), auto on CUDA for file sources
    when torchvision decodes JPEGs there and the policy (if any) runs on the device, cpu never."""
    auto_cpu = device.type != "cuda" or cfg.source not in FILE_SOURCES or cfg.auto_augment == "augmix"
    if cfg.decode == "cpu" or (cfg.decode == "auto" and auto_cpu):
        return False
    if device.type == "cuda":
        try:
            decode_jpeg([encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))], device=device)
        except RuntimeError as exc:
            if cfg.decode == "auto":
                return False
            raise ConfigError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device} "
                              f"({str(exc).splitlines()[0]}); set data.decode=cpu") from None
    return True


class Decoded(NamedTuple):
    """A batch's files decoded in full (None: unreadable, skipped), and how many of them PIL read."""

    images: list[torch.Tensor | None]
    by_pil: int


class DeviceDecoder:
    """Turns a batch of :class:`EncodedImages` into uint8 images on ``device``, in ``memory_format``.

    Counts the samples it served and those decoded on the CPU (by the workers or by PIL here).
    """

    def __init__(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
                 policy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device, self.memory_format, self.policy = device, memory_format, policy
        self.samples = self.cpu_decoded = 0

    def __call__(self, batch: Batch, describe: Callable[[int], str] = lambda index: f"#{index}",
                 skip_bad: bool = False) -> Batch:
        """The batch with its images decoded; unreadable samples dropped (and counted) in skip mode."""
        return self.finish(batch, self.decode(batch, describe, skip_bad))

    def decode(self, batch: Batch, describe: Callable[[int], str], skip_bad: bool) -> Decoded:
        """The batch's files decoded, in full (no RNG, no state: it may run on another thread)."""
        encoded = batch.images
        if not isinstance(encoded, EncodedImages):
            return Decoded([], 0)
        files, indices = encoded.files(), batch.indices[encoded.at].tolist()
        try:
            return Decoded(list(decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)), 0)
        except RuntimeError:  # one bad file fails the batch: each alone
            images = [self._decode_one(file, index, describe, skip_bad) for file, index in zip(files, indices)]
        return Decoded([image for image, _ in images], sum(by_pil for _, by_pil in images))

    def finish(self, batch: Batch, decoded: Decoded) -> Batch:
        """Each decoded file cut, resized, flipped (and augmented) as its plan says, beside the pixels
        the workers decoded, stacked in the memory format; unreadable samples dropped."""
        encoded = batch.images
        if not isinstance(encoded, EncodedImages):  # no sample was for the device: all decoded by the workers
            self.samples += len(batch.targets)
            self.cpu_decoded += len(batch.targets)
            return batch
        images: list[torch.Tensor | None] = [None] * len(encoded)
        self.cpu_decoded += decoded.by_pil
        plans = encoded.plans.tolist()
        saved = torch.get_rng_state() if encoded.rng is not None and self.policy is not None else None
        try:
            for j, (position, image) in enumerate(zip(encoded.at.tolist(), decoded.images)):
                if image is not None:
                    if saved is not None:
                        torch.set_rng_state(encoded.rng[j].clone())  # type: ignore[index]  # a view crashes it
                    images[position] = self._shape(image, Plan.from_row(plans[j]), saved is not None)
        finally:
            if saved is not None:
                torch.set_rng_state(saved)
        ready = encoded.ready.to(self.device, non_blocking=True)
        for j, position in enumerate(encoded.ready_at.tolist()):
            images[position] = ready[j]
        self.samples += len(images)
        self.cpu_decoded += len(ready)
        kept = [position for position, image in enumerate(images) if image is not None]
        if not kept:
            nothing = torch.empty(0, dtype=torch.long)
            return Batch(torch.empty(0, dtype=torch.uint8), nothing, batch.skipped + len(images), nothing, nothing)
        stacked = torch.stack([images[position] for position in kept])  # type: ignore[misc]
        stacked = stacked.contiguous(memory_format=self.memory_format)
        if len(kept) == len(images):
            return batch._replace(images=stacked)
        rows = torch.tensor(kept, dtype=torch.long)
        return Batch(stacked, batch.targets[rows], batch.skipped + len(images) - len(kept), batch.indices[rows],
                     None if batch.repeats is None else batch.repeats[rows])

    def _decode_one(self, file: torch.Tensor, index: int, describe: Callable[[int], str],
                    skip_bad: bool) -> tuple[torch.Tensor | None, bool]:
        """One file on the device, else by PIL, else unreadable (None in skip mode); and whether PIL read it."""
        try:
            return decode_jpeg([file], mode=ImageReadMode.RGB, device=self.device)[0], False
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(file.numpy().tobytes())) as image:
                pixels = F.pil_to_tensor(image.convert("RGB"))
        except Exception as exc:  # PIL's errors for a damaged file: OSError, SyntaxError, ValueError...
            if skip_bad:
                return None, False
            raise DataError(f"cannot read sample {describe(index)}: {exc}; "
                            "fix or remove it, or set data.on_bad_sample=skip") from None
        return pixels.to(self.device), True

    def _shape(self, image: torch.Tensor, plan: Plan, augment: bool) -> torch.Tensor:
        """Box, resize, crop and flip, as the CPU transform does them; then the policy."""
        top, left, height, width = plan.box
        image = F.resize(image[:, top:top + height, left:left + width], list(plan.size), antialias=True)
        top, left, height, width = plan.crop
        image = image[:, top:top + height, left:left + width]
        if plan.flip:
            image = image.flip(-1)
        return self.policy(image) if augment and self.policy is not None else image
