"""The device batch stages: what happens to a batch on the device, after the copy and before the step.

Loader workers return uint8 images (see :mod:`trainer.data.decode`) and stay cheap; a batch is
copied to the device once and passes through an ordered list of stages there. Normalisation is
the first stage and the only one every consumer (training, evaluation, prediction, the pictures
of a run) applies; random stages (erasing, mixup, GPU decoding) plug in after it in training.

A random stage draws through :class:`BatchDraw`: per sample from (seed, epoch, sample index,
repeat), per batch from (seed, epoch, global offset of the micro-batch, rank). Neither depends on the
world size, the batch split or the loader workers, so a resume stays exact, and ranks never draw
alike. A user's data set that yields float tensors is taken as already normalised.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Protocol, Sequence, TypeVar

import numpy as np
import torch

_MASK32 = 0xFFFF_FFFF
_Word = TypeVar("_Word", torch.Tensor, int)


class Batch(NamedTuple):
    """What a loader yields: stacked images and targets as loaded, how many samples were dropped
    as unreadable, and the data-set index and repeat number of each sample kept (for per-sample
    draws; no repeats: all 0). With ``data.decode=gpu`` the images are still encoded
    (:class:`trainer.data.encoded.EncodedImages`) until :meth:`DeviceStages.batches` decodes them."""

    images: Any
    targets: torch.Tensor
    skipped: int
    indices: torch.Tensor
    repeats: torch.Tensor | None = None


def _mix32(x: _Word) -> _Word:
    """A 32-bit integer hash (xorshift-multiply) of an int64 tensor, elementwise, or of a Python int:
    computed without overflow, the same value either way."""
    for multiplier in (0x7FEB352D, 0x46F0D5EB):  # both < 2**31: products stay below 2**63
        x = (x ^ (x >> 16)) & _MASK32
        x = (x * multiplier) & _MASK32
    return (x ^ (x >> 16)) & _MASK32


def _key(*words: int) -> int:
    """One 32-bit hash of several integers, in Python integers (no tensor work)."""
    x = 0
    for word in words:
        x = _mix32(x ^ (word & _MASK32))
    return x


@dataclass(frozen=True)
class BatchDraw:
    """The random numbers a stage may use for one micro-batch, as pure functions of where it is."""

    seed: int
    epoch: int
    offset: int
    """Samples of the epoch's global order before this micro-batch (the same on every rank)."""
    rank: int
    indices: torch.Tensor
    """The data-set index of each sample, on the batch's device."""
    repeats: torch.Tensor | None = None
    """Which copy of its sample each is, with repeated augmentation (None: all 0)."""

    def per_sample(self, stream: int) -> torch.Tensor:
        """One uniform number in [0, 1) per sample, from (seed, epoch, index, repeat, stream): a
        sample draws the same whichever batch, rank or resume it falls in, its copies differently.
        ``stream`` tells a stage's independent draws apart."""
        sample = _mix32(self.indices.to(torch.int64) & _MASK32)
        if self.repeats is not None:  # _mix32(0) == 0: copy 0 draws as with no repeats
            sample = sample ^ _mix32(self.repeats.to(torch.int64) & _MASK32)
        x = _mix32(sample ^ _key(self.seed, self.epoch, stream))
        return x.to(torch.float64).div_(2.0 ** 32).to(torch.float32)

    def per_batch(self, stream: int) -> torch.Generator:
        """A CPU generator seeded from (seed, epoch, offset, rank, stream), for draws shared by the
        whole micro-batch (a mixup ratio); move what it draws to the device yourself."""
        return torch.Generator().manual_seed(_key(self.seed, self.epoch, self.offset, self.rank, stream))


class BatchStage(Protocol):
    """One step of the device pipeline: ``(images, targets) -> (images, targets)`` on the device.

    A stage may change the target form (mixup turns class indices into soft vectors): the Task
    it trains with must accept what comes out.
    """

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 draw: BatchDraw) -> tuple[torch.Tensor, torch.Tensor]: ...


class Normalize:
    """``(x / 255 - mean) / std`` for uint8 batches, the same operations as torchvision's
    ``ToTensor`` + ``Normalize`` (so the same values); any other dtype passes as is."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images on the device; the memory format (channels_last) is kept."""
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def to_pixels(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) images, uint8 or normalised floats, as displayable (N, H, W, C) uint8."""
        images = images.cpu()
        if images.dtype != torch.uint8:
            pixels = (images.float() * self.std.cpu() + self.mean.cpu()).clamp(0, 1) * 255
            images = pixels.round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).numpy()


class BatchDecoder(Protocol):
    """Decodes a loader's batch of encoded images on the device (see :mod:`trainer.data.device_decode`)
    in two parts: ``decode`` the files (stateless: any thread), then ``finish`` the batch (cut, resize,
    augment: the main thread, it uses the torch RNG); counts the samples it served and those decoded
    on the CPU instead."""

    device: torch.device
    samples: int
    cpu_decoded: int

    def decode(self, batch: Batch, describe: Any, skip_bad: bool) -> Any: ...

    def finish(self, batch: Batch, decoded: Any) -> Batch: ...


class DecodeAhead:
    """A loader's batches with their images decoded on the device, one batch ahead.

    torchvision's batched JPEG decoder makes the calling thread wait until its own stream has
    decoded the files, so the files of batch k+1 are decoded on a thread of this class while the
    main thread cuts batch k (on a side CUDA stream, which waits for nothing on the compute stream)
    and queues its step. The compute stream waits for the side stream's event only, and the images
    are recorded on it (``record_stream``) so that their memory is not reused too early. On a CPU
    the same happens with CPU tensors. ``decoding`` adds up the seconds the main thread spends
    waiting for decoded files and cutting them: not waiting for the loader.
    """

    def __init__(self, loader: Iterable[Batch], decoder: BatchDecoder | None) -> None:
        self.loader, self.decoder, self.decoding = loader, decoder, 0.0
        self.describe = getattr(getattr(loader, "dataset", None), "describe", lambda index: f"#{index}")
        self.skip_bad = bool(getattr(getattr(loader, "dataset", None), "skip_bad", False))
        self.device = decoder.device if decoder is not None else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self) -> Iterator[Batch]:
        if self.decoder is None:
            yield from self.loader
            return
        with ThreadPoolExecutor(1, thread_name_prefix="decode", initializer=self._on_thread) as thread:
            batches = iter(self.loader)
            pending = self._submit(thread, next(batches, None))
            for batch in batches:
                following = self._submit(thread, batch)
                yield self._finish(*pending)  # type: ignore[misc]
                pending = following
            if pending is not None:
                yield self._finish(*pending)

    def _on_thread(self) -> None:
        if self.stream is not None:
            torch.cuda.set_device(self.device)

    def _submit(self, thread: ThreadPoolExecutor, batch: Batch | None) -> tuple[Batch, Future] | None:
        return None if batch is None else (batch, thread.submit(self._decode, batch))

    def _decode(self, batch: Batch) -> Any:
        assert self.decoder is not None
        if self.stream is None:
            return self.decoder.decode(batch, self.describe, self.skip_bad)
        with torch.cuda.stream(self.stream):  # its images are allocated for the side stream, which waits for them
            return self.decoder.decode(batch, self.describe, self.skip_bad)

    def _finish(self, batch: Batch, files: Future) -> Batch:
        assert self.decoder is not None
        started = time.perf_counter()
        if self.stream is None:
            decoded = self.decoder.finish(batch, files.result())
        else:
            with torch.cuda.stream(self.stream):
                decoded = self.decoder.finish(batch, files.result())
                event = torch.cuda.Event()
                event.record(self.stream)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            if decoded.images.is_cuda:
                decoded.images.record_stream(compute)
        self.decoding += time.perf_counter() - started
        return decoded


class DeviceStages:
    """Copies a loader's batch to the device (in the model's memory format) and runs the stages
    in order: normalisation first, then ``extra`` (training's random stages). With a ``decoder``
    (``data.decode=gpu``), :meth:`batches` decodes the loader's batches on the device first."""

    def __init__(self, normalize: Normalize, device: torch.device, seed: int,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 extra: Sequence[BatchStage] = (), decoder: BatchDecoder | None = None) -> None:
        self.normalize, self.device, self.seed, self.memory_format = normalize, device, seed, memory_format
        self.extra, self.decoder = list(extra), decoder

    def batches(self, loader: Iterable[Batch]) -> DecodeAhead:
        """``loader``'s batches, their images decoded on the device when there is a decoder."""
        return DecodeAhead(loader, self.decoder)

    def copy(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images (as loaded) and targets on the device."""
        images = batch.images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, batch.targets.to(self.device, non_blocking=True)

    def __call__(self, batch: Batch, epoch: int = 0, offset: int = 0,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input and the targets of a training micro-batch at ``offset`` of ``epoch``."""
        images, targets = self.copy(batch)
        images = self.normalize(images)
        if self.extra:  # the draws are made only for stages that may use them
            repeats = None if batch.repeats is None else batch.repeats.to(self.device, non_blocking=True)
            draw = BatchDraw(self.seed, epoch, offset, rank, batch.indices.to(self.device, non_blocking=True), repeats)
            for stage in self.extra:
                images, targets = stage(images, targets, draw)
        return images, targets
