"""Pictures drawn with PIL (already a torchvision dependency): confusion matrices, labelled image
grids and line charts. Pure functions from arrays to ``PIL.Image``; no training state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_LABELLED_CLASSES = 100
"""Up to this many classes the confusion matrix is drawn with class names; beyond, unlabelled."""
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""Line colours (the familiar tab10 cycle)."""
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
DARK_BLUE = np.array([8, 48, 107], dtype=np.float64)


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_width(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    left, _, right, _ = face.getbbox(text)
    return int(right - left)


def _fit(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits in ``width`` pixels."""
    if _text_width(text, face) <= width:
        return text
    while len(text) > 1 and _text_width(text + "…", face) > width:
        text = text[:-1]
    return text + "…"


def _shade(fractions: np.ndarray) -> np.ndarray:
    """Fractions in [0, 1] to RGB: white (0) to dark blue (1), on a square-root scale so that
    confusions of a few percent still show."""
    t = np.sqrt(np.clip(fractions, 0.0, 1.0))[..., None]
    return (255.0 * (1 - t) + DARK_BLUE * t).astype(np.uint8)


def confusion_image(confusion: np.ndarray, classes: list[str]) -> Image.Image:
    """The confusion matrix (rows: true class, columns: predicted), each row shaded by the share
    of that class's samples; class names on both axes up to :data:`MAX_LABELLED_CLASSES`,
    counts in the cells when they fit."""
    n = len(classes)
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=np.float64), where=totals > 0)
    if n > MAX_LABELLED_CLASSES:
        scale = max(1, 600 // n)
        cells = Image.fromarray(_shade(shares)).resize((n * scale, n * scale), Image.NEAREST)
        return _titled(cells, f"confusion matrix, {n} classes (rows: true, columns: predicted; "
                              "row-normalised); top confusions in the table")
    cell = max(10, min(48, 640 // n))
    face = font(max(9, min(14, cell - 2)))
    label_width = min(160, max(_text_width(name, face) for name in classes) + 8)
    grid = Image.fromarray(_shade(shares)).resize((n * cell, n * cell), Image.NEAREST)
    if cell >= 28:
        draw = ImageDraw.Draw(grid)
        for (row, col), count in np.ndenumerate(confusion):
            if count:
                text = f"{int(count)}"
                colour = WHITE if shares[row, col] > 0.25 else BLACK
                draw.text((col * cell + cell / 2, row * cell + cell / 2), text, fill=colour, font=face, anchor="mm")
    canvas = Image.new("RGB", (label_width + n * cell + 8, label_width + n * cell + 8), WHITE)
    canvas.paste(grid, (label_width, label_width))
    draw = ImageDraw.Draw(canvas)
    top = Image.new("RGB", (label_width, n * cell), WHITE)  # column labels, drawn across then turned
    top_draw = ImageDraw.Draw(top)
    for i, name in enumerate(classes):
        label = _fit(name, face, label_width - 8)
        y = label_width + i * cell + cell / 2
        draw.text((label_width - 4, y), label, fill=BLACK, font=face, anchor="rm")
        top_draw.text((4, i * cell + cell / 2), label, fill=BLACK, font=face, anchor="lm")
    canvas.paste(top.transpose(Image.Transpose.ROTATE_90), (label_width, 0))
    draw.rectangle([label_width - 1, label_width - 1, label_width + n * cell, label_width + n * cell], outline=GREY)
    draw.multiline_text((4, 4), "rows: true\ncolumns:\npredicted", fill=BLACK, font=font(10))
    return canvas


def _titled(picture: Image.Image, title: str) -> Image.Image:
    face = font(13)
    canvas = Image.new("RGB", (max(picture.width, _text_width(title, face) + 16), picture.height + 24), WHITE)
    ImageDraw.Draw(canvas).text((8, 4), title, fill=BLACK, font=face)
    canvas.paste(picture, (0, 24))
    return canvas


def image_grid(images: np.ndarray, captions: list[str], columns: int = 8, min_tile: int = 96,
               max_tile: int = 128) -> Image.Image:
    """``images`` (N, H, W, 3 uint8) in a grid, each with its caption (one or two lines) below.

    Small images are enlarged by a whole factor (nearest neighbour) so their pixels stay visible;
    large ones shrink to ``max_tile`` pixels, which keeps a picture per epoch small in the logs.
    """
    count, height, width = images.shape[:3]
    side = max(height, width)
    scale = max(1, math.ceil(min_tile / side)) if side < min_tile else min(1.0, max_tile / side)
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    face = font(11)
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    caption_h = 14 * lines + 4
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    canvas = Image.new("RGB", (columns * (tile_w + 4) + 4, rows * (tile_h + caption_h + 4) + 4), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i in range(count):
        x = 4 + (i % columns) * (tile_w + 4)
        y = 4 + (i // columns) * (tile_h + caption_h + 4)
        canvas.paste(Image.fromarray(images[i]).resize((tile_w, tile_h), resample), (x, y))
        for j, line in enumerate(captions[i].split("\n")):
            draw.text((x, y + tile_h + 2 + 14 * j), _fit(line, face, tile_w), fill=BLACK, font=face)
    return canvas


@dataclass
class Panel:
    """One chart: a title and named series of (x, y) points."""

    title: str
    x_label: str
    series: dict[str, tuple[list[float], list[float]]]


def line_chart(panels: list[Panel], width: int = 520, height: int = 360) -> Image.Image:
    """Panels side by side, each with axes, five ticks per axis and a legend of its series."""
    canvas = Image.new("RGB", (width * len(panels), height), WHITE)
    for i, panel in enumerate(panels):
        canvas.paste(_panel(panel, width, height), (i * width, 0))
    return canvas


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def _panel(panel: Panel, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    face, small = font(13), font(11)
    left, right, top, bottom = 64, width - 16, 32, height - 44
    points = [(x, y) for xs, ys in panel.series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    draw.text((width / 2, 8), panel.title, fill=BLACK, font=face, anchor="mt")
    draw.text(((left + right) / 2, height - 6), panel.x_label, fill=BLACK, font=small, anchor="mb")
    draw.rectangle([left, top, right, bottom], outline=BLACK)
    if not points:
        return image
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    margin = (y_high - y_low) * 0.05 or abs(y_high) * 0.05 or 1.0
    y_low, y_high = y_low - margin, y_high + margin
    x_span = (x_high - x_low) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / x_span * (right - left), bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for value in _ticks(y_low, y_high):
        _, y = at(x_low, value)
        draw.line([left, y, right, y], fill=(235, 235, 235))
        draw.text((left - 4, y), f"{value:.3g}", fill=BLACK, font=small, anchor="rm")
    x_ticks = _ticks(x_low, x_high)
    if all(float(x).is_integer() for x, _ in points):  # epochs: whole numbers only
        x_ticks = sorted({float(round(value)) for value in x_ticks})
    for value in x_ticks:
        x, _ = at(value, y_low)
        draw.text((x, bottom + 4), f"{value:g}", fill=BLACK, font=small, anchor="mt")
    for k, (name, (xs, ys)) in enumerate(panel.series.items()):
        colour = PALETTE[k % len(PALETTE)]
        line = [at(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        legend_y = top + 6 + 15 * k
        draw.line([left + 8, legend_y + 6, left + 24, legend_y + 6], fill=colour, width=2)
        draw.text((left + 28, legend_y), _fit(name, small, right - left - 36), fill=BLACK, font=small)
    return image
