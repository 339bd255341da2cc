"""From an image file to the uint8 (3, H, W) tensor a loader worker returns.

Workers return uint8, not float: a quarter of the bytes through shared memory and pinning. The
conversion to float and the normalisation happen on the device (:mod:`trainer.data.stages`).

Training crops decode JPEGs at a reduced size where the crop allows it: libjpeg scales by 1/2,
1/4 or 1/8 inside its inverse DCT (PIL's ``Image.draft``), far cheaper than decoding every pixel
and then throwing most of them away. The crop is drawn on the full-size geometry from the torch
RNG exactly as torchvision's ``RandomResizedCrop`` draws it (then one draw for the flip), so the
augmentation stays a pure function of the per-sample seed (see ``data.SeededTransformDataset``);
only the resampling of the chosen box differs from a full-size decode. This needs the data set to
hand over the file opened but not yet decoded (:func:`open_image`); an image already decoded is
cropped at full size.

An RGB JPEG held in memory (a prepared shard's sample, :mod:`trainer.data.shards`) that no reduced
decode applies to is decoded by ``torchvision.io.decode_jpeg`` and cropped as a uint8 tensor: the
same libjpeg-turbo decode and antialiased bilinear resize as PIL's (pixels within 1), without PIL's
copies and conversions, at about half the cost (docs/benchmarks.md); the steps after it (flip,
policy) take the tensor as torchvision's transforms do.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import decode_jpeg
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as tensor_ops

DRAFT_SCALES = (8, 4, 2)
"""The reductions libjpeg decodes at, largest first (1/8, 1/4, 1/2)."""


def open_image(path: str) -> Image.Image:
    """A data set's loader: the image file opened (header read, pixels not decoded yet).

    Unlike torchvision's default loader, which decodes the whole image at once, this leaves the
    transform free to ask a JPEG for a reduced-size decode. PIL closes the file after decoding.
    """
    return Image.open(path)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK... as RGB (decodes a lazily opened file)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor (channels-last in memory; collation stacks it);
    a tensor (cropped from an in-memory JPEG) as it is."""
    return image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)


def jpeg_in_memory(image: Image.Image) -> torch.Tensor | None:
    """The bytes of an RGB JPEG opened from memory and not decoded yet (``tile`` still set), else None.

    Files keep PIL's decode: torchvision's policies and the tests of the pipeline against them work
    on PIL images, and a file's large photo may decode at a reduced size (``data.jpeg_draft``)."""
    source = getattr(image, "fp", None)
    if image.format != "JPEG" or image.mode != "RGB" or not image.tile or not isinstance(source, io.BytesIO):
        return None
    return torch.frombuffer(bytearray(source.getvalue()), dtype=torch.uint8)


def _decoded(image: Image.Image) -> torch.Tensor | None:
    """An RGB JPEG in memory, not decoded yet, decoded by torchvision.io into a uint8 (3, H, W) tensor; None for
    any other image, or for damaged data (PIL then decodes it and names what is wrong, as for any file)."""
    data = jpeg_in_memory(image)
    if data is None:
        return None
    try:
        pixels = decode_jpeg(data)
    except RuntimeError:
        return None
    image.close()
    return pixels


def draft_scale(crop_height: int, crop_width: int, size: int) -> int:
    """The largest JPEG reduction that still leaves the crop at least ``size`` pixels on each side."""
    return next((s for s in DRAFT_SCALES if min(crop_height, crop_width) >= s * size), 1)


class ResizedCrop:
    """torchvision's ``RandomResizedCrop`` (same draws from the torch RNG, bilinear, antialiased) on
    a PIL image, with reduced-size JPEG decoding when ``draft`` is on."""

    def __init__(self, size: int, scale: tuple[float, float], draft: bool,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio, self.draft = size, scale, ratio, draft

    def box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, drawn from the header's size alone."""
        return transforms.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))

    def __call__(self, image: Image.Image) -> Image.Image | torch.Tensor:
        top, left, height, width = self.box(image)
        factor = self._reduce(image, height, width) if self.draft else 1.0
        if factor == 1.0 and (pixels := _decoded(image)) is not None:
            return tensor_ops.resized_crop(pixels, top, left, height, width, [self.size, self.size],
                                           antialias=True)  # uint8 all through (torchvision's v1 goes by float)
        image = to_rgb(image)
        if factor == 1.0:
            return F.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        box = (left * factor, top * factor, (left + width) * factor, (top + height) * factor)
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)

    def _reduce(self, image: Image.Image, height: int, width: int) -> float:
        """Ask a not yet decoded JPEG to decode at a reduced size; the factor applied to coordinates."""
        scale = draft_scale(height, width, self.size)
        if scale == 1 or image.format != "JPEG":
            return 1.0
        full_width, full_height = image.size
        drafted = image.draft("RGB", (full_width // scale, full_height // scale))  # None once decoded
        return 1.0 if drafted is None else drafted[1][2] / full_width
