"""The drawing primitives of the generated datasets (``synthetic.py``'s demo preset and ``cluttered.py``): the six
shape classes, their COCO category ids, a shape's mask inside a box, a mask's tight box, an object colour that
stands out from the background."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "CATEGORY_IDS", "draw_shape_mask", "mask_to_xywh", "object_colour"]

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond")
CATEGORY_IDS = (1, 3, 5, 7, 9, 11)  # gaps on purpose: labels must go through the LabelMap


def draw_shape_mask(shape: str, canvas_hw: tuple[int, int], box: tuple[int, int, int, int],
                    rng: np.random.Generator) -> np.ndarray:
    """Binary (H,W) mask of ``shape`` drawn inside the inclusive pixel box ``(x0, y0, x1, y1)``.

    The shape need not touch every side of ``box`` (e.g. a triangle's apex position is random): annotation boxes
    are always recomputed from the mask, never taken from ``box``.
    """
    height, width = canvas_hw
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    bw, bh = x1 - x0, y1 - y0
    if shape == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        apex = x0 + int(rng.integers(0, bw + 1))
        points = [(apex, y0), (x0, y1), (x1, y1)]
        if rng.random() < 0.5:  # upside-down half of the time
            points = [(apex, y1), (x0, y0), (x1, y0)]
        draw.polygon(points, fill=255)
    elif shape == "cross":
        tx, ty = max(1, bw // 6), max(1, bh // 6)
        cx, cy = x0 + bw // 2, y0 + bh // 2
        draw.rectangle([cx - tx, y0, cx + tx, y1], fill=255)
        draw.rectangle([x0, cy - ty, x1, cy + ty], fill=255)
    elif shape == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=255)
        tx, ty = max(2, bw // 5), max(2, bh // 5)
        draw.ellipse([x0 + tx, y0 + ty, x1 - tx, y1 - ty], fill=0)
    elif shape == "diamond":
        cx, cy = x0 + bw // 2, y0 + bh // 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas) > 0


def mask_to_xywh(mask: np.ndarray) -> list[int]:
    """Tight COCO box ``[x, y, w, h]`` of a non-empty mask; pixel ``i`` spans ``[i, i+1)``, hence the ``+1``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """(3,) uint8 colour, resampled a few times to lie far from the background's mean (objects stay visible)."""
    for _ in range(10):
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - background_mean) > 100:
            break
    return colour.astype(np.uint8)
