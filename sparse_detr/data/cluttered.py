"""The ``cluttered`` synthetic preset: scenes in which choosing which encoder tokens to update matters.

Compared with the ``demo`` preset (``synthetic.py``), a cluttered scene has

* a textured, noisy background: a smooth colour field (upsampled coarse noise), a sinusoidal grating and per-pixel
  Gaussian noise, so no background region is free of structure and "not flat" does not mean "object";
* many objects of the six classes over a wide, COCO-like size range: the side is log-uniform, so on 192-256 px
  images about 40% are small (visible area < 32², COCO's small), 50% medium and 10% large (>= 96²) with the
  default range (``min_object_side`` = 14 px to ``max_object_scale`` = 0.95 of the short side);
* distractor shapes of no class (thin lines, corners, hollow frames, stars) in the same colours as the objects;
* partial occlusion: shapes are painted largest first and paint over earlier ones, but a placement is rejected
  when it would hide more than ``MAX_HIDDEN`` of an already drawn object, so every annotated object stays
  recognisable.

Objects are painted in one flat colour (no noise on them): the instance map is then checkable against the saved
pixels. Every box is EXACT, the tight box of the object's pixels still visible at the end (``mask_to_xywh``), and
``area`` is their count. Randomness comes only from the ``rng`` passed in, so a scene is a function of its seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sparse_detr.data.shapes import CATEGORY_IDS, SHAPES, draw_shape_mask, mask_to_xywh, object_colour

__all__ = ["DISTRACTORS", "MAX_HIDDEN", "MIN_OBJECT_SIDE", "MAX_OBJECT_SCALE", "textured_background",
           "draw_distractor_mask", "render_cluttered"]

DISTRACTORS = ("line", "corner", "frame", "star")  # none of them is one of SHAPES
MAX_HIDDEN = 0.5  # largest fraction of an object's drawn pixels that later shapes may cover
MIN_SIDE = 8  # pixels; smaller shapes lose their identity on the stride-8 feature map
MIN_OBJECT_SIDE = 14  # pixels: the default lower end of the object side distribution
MAX_OBJECT_SCALE = 0.95  # the default upper end, as a fraction of the image's short side


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H,W,3) float image in [0, 255]: smooth colour blotches + a grating + pixel noise."""
    cell = int(rng.integers(12, 40))  # blotch size in pixels
    gh, gw = height // cell + 2, width // cell + 2
    base = rng.uniform(40, 215, size=3)
    coarse = base + rng.normal(0.0, 22.0, size=(gh, gw, 3))
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                                  .resize((width, height), Image.BILINEAR)) for c in range(3)], axis=-1)
    ys, xs = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
    grating = rng.uniform(5, 18) * np.sin(phase)[..., None] * rng.uniform(0.3, 1.0, size=3)
    noise = rng.normal(0.0, rng.uniform(4, 12), size=(height, width, 3))
    return np.clip(smooth + grating + noise, 0, 255)


def draw_distractor_mask(kind: str, canvas_hw: tuple[int, int], box: tuple[int, int, int, int],
                         rng: np.random.Generator) -> np.ndarray:
    """Binary (H,W) mask of a no-class shape inside the inclusive pixel box ``(x0, y0, x1, y1)``."""
    height, width = canvas_hw
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    bw, bh = x1 - x0, y1 - y0
    thick = max(1, min(bw, bh) // 8)
    if kind == "line":
        ends = [(x0, y0), (x1, y1)] if rng.random() < 0.5 else [(x0, y1), (x1, y0)]
        draw.line(ends, fill=255, width=thick)
    elif kind == "corner":  # an L
        draw.rectangle([x0, y0, x0 + thick, y1], fill=255)
        draw.rectangle([x0, y1 - thick, x1, y1], fill=255)
    elif kind == "frame":  # a hollow rectangle (the "rectangle" class is filled)
        draw.rectangle([x0, y0, x1, y1], fill=255)
        draw.rectangle([x0 + thick + 1, y0 + thick + 1, x1 - thick - 1, y1 - thick - 1], fill=0)
    elif kind == "star":  # five points
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
        angles = np.arange(10) * np.pi / 5 - np.pi / 2 + rng.uniform(0, np.pi / 5)
        points = [(cx + r * bw / 2 * np.cos(a), cy + r * bh / 2 * np.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown distractor {kind!r}; expected one of {DISTRACTORS}")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = np.asarray(canvas)[y0:y1 + 1, x0:x1 + 1] > 0  # a wide line overshoots its ends
    return mask


def _random_box(rng: np.random.Generator, width: int, height: int, side: float) -> tuple[int, int, int, int]:
    """An inclusive box of about ``side`` pixels with a random aspect ratio and position."""
    aspect = rng.uniform(0.6, 1.6)
    bw = int(np.clip(side * np.sqrt(aspect), MIN_SIDE, width - 1))
    bh = int(np.clip(side / np.sqrt(aspect), MIN_SIDE, height - 1))
    x0, y0 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
    return x0, y0, x0 + bw, y0 + bh


def _hides_too_much(mask: np.ndarray, instance: np.ndarray, drawn_area: np.ndarray,
                    visible: np.ndarray) -> bool:
    """Would painting ``mask`` leave some object with less than (1 - MAX_HIDDEN) of its drawn pixels?"""
    if len(drawn_area) == 0:
        return False
    owners = instance[mask]
    lost = np.bincount(owners[owners >= 0], minlength=len(drawn_area))
    return bool(((visible - lost) < (1 - MAX_HIDDEN) * drawn_area).any())


def render_cluttered(rng: np.random.Generator, width: int, height: int, num_objects: int,
                     min_object_side: int = MIN_OBJECT_SIDE, max_object_scale: float = MAX_OBJECT_SCALE
                     ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one cluttered scene; the contract of ``synthetic.render_image``.

    Returns (uint8 (H,W,3) image, int (H,W) instance map, objects). The instance map is -1 where no object is
    visible (background and distractors) and ``k`` where ``objects[k]`` is; ``objects[k]`` has ``category_id``,
    ``bbox`` (tight COCO xywh box of those pixels), ``area`` (their count) and ``colour``. An object that cannot be
    placed within the occlusion limit after 20 tries is left out (a crowded image gets fewer objects).
    Object sides are log-uniform in [``min_object_side`` pixels, ``max_object_scale`` × the short side]: the
    difficulty knobs of the preset (a higher minimum means fewer small objects, a lower maximum fewer huge shapes
    that everything else occludes); occlusion can still leave smaller visible parts.
    """
    image = textured_background(rng, height, width)
    instance = np.full((height, width), -1, dtype=np.int32)
    num_distractors = int(rng.integers(1, 3 + num_objects // 3))
    short = min(width, height)
    # Sides log-uniform in [min_object_side, max_object_scale * short] (distractors in [14, 0.35 * short]), painted
    # largest first, as nearer small things in a photo cover farther big ones; objects and distractors interleave
    # and occlude each other.
    is_distractor = np.array([False] * num_objects + [True] * num_distractors)
    hi = np.where(is_distractor, 0.35, max_object_scale) * short
    lo = np.where(is_distractor, MIN_OBJECT_SIDE, min(min_object_side, max_object_scale * short))
    sides = np.exp(rng.uniform(np.log(lo), np.log(np.maximum(hi, lo))))
    drawn_area, visible, meta = np.zeros(0, np.int64), np.zeros(0, np.int64), []
    for i in np.argsort(-sides, kind="stable"):
        if is_distractor[i]:
            kind, draw = DISTRACTORS[int(rng.integers(0, len(DISTRACTORS)))], draw_distractor_mask
        else:
            kind, draw = SHAPES[int(rng.integers(0, len(SHAPES)))], draw_shape_mask
        for _attempt in range(20):
            mask = draw(kind, (height, width), _random_box(rng, width, height, sides[i]), rng)
            if mask.any() and not _hides_too_much(mask, instance, drawn_area, visible):
                break
        else:
            continue
        colour = object_colour(rng, image[mask].mean(axis=0))  # away from the background under it
        owners = instance[mask]
        visible = visible - np.bincount(owners[owners >= 0], minlength=len(visible))
        image[mask] = colour
        if is_distractor[i]:
            instance[mask] = -1
        else:
            instance[mask] = len(meta)
            meta.append((SHAPES.index(kind), colour))
            drawn_area = np.append(drawn_area, int(mask.sum()))
            visible = np.append(visible, int(mask.sum()))

    objects = []
    for k, (shape_index, colour) in enumerate(meta):
        pixels = instance == k  # never empty: the occlusion limit keeps half of every object
        objects.append({"category_id": CATEGORY_IDS[shape_index], "bbox": mask_to_xywh(pixels),
                        "area": int(pixels.sum()), "colour": colour.tolist()})
    return image.astype(np.uint8), instance, objects
