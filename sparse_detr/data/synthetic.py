"""A small synthetic COCO-format dataset of coloured shapes, for demos, smoke tests and overfitting checks.

``make_synthetic_coco(out_dir, ...)`` writes::

    out_dir/train/000000.png ...          out_dir/val/000000.png ...
    out_dir/annotations/instances_train.json, instances_val.json

Images have a random background (solid colour, noise or a gradient) and sides in ``[min_size, max_size]``. Objects
are six shapes with deliberately non-contiguous category ids (1, 3, ..., 11) so the label map is exercised; they
vary in size, aspect, colour and count (0..max_objects, every ``empty_every``-th image has none) and may partly
overlap. Each box is EXACT: the tight box of the pixels of that object still visible in the saved image (later
objects paint over earlier ones; an instance map tracks who owns each pixel), and ``area`` is that pixel count.

Determinism: image ``i`` of a split draws from ``numpy.random.default_rng([seed, split, i])`` only, so the same
arguments give byte-identical files (PNG without metadata, json with fixed key order) and changing ``num_train``
does not change the validation images. Drawing uses PIL without anti-aliasing, so masks are binary.

Presets: ``preset="demo"`` (the above, a quick demo) or ``"cluttered"`` (``cluttered.py``: textured background,
many objects over a COCO-like size range, distractor shapes of no class, partial occlusion; for the ablations).

Nothing of the user's is ever overwritten or deleted: generation goes only into a missing or empty folder, or one
that carries this generator's marker (``synthetic_params.json``, written before the first file) with the same
parameters; any other folder is a ``SyntheticFolderError`` naming it. ``ensure_synthetic(out_dir, **kwargs)``
reuses a complete folder of the same parameters and generates otherwise. Under torchrun, call it on the main
process and then barrier.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from sparse_detr.data.cluttered import render_cluttered
from sparse_detr.data.shapes import CATEGORY_IDS, SHAPES, draw_shape_mask, mask_to_xywh, object_colour
from sparse_detr.errors import UserError
from sparse_detr.progress import Progress

SPLITS = ("train", "val")
PRESETS = ("demo", "cluttered")
MARKER = "synthetic_params.json"
GENERATOR_VERSION = 1  # bump when the drawing changes: a folder of another version is then refused, not reused


class SyntheticFolderError(UserError, ValueError):
    """The output folder holds files this generator did not write (or wrote with other parameters)."""


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(H,W,3) float background and its mean colour (objects are coloured away from it)."""
    kind = rng.integers(0, 3)
    c0 = rng.uniform(0, 255, size=3)
    if kind == 0:  # solid
        image = np.broadcast_to(c0, (height, width, 3)).copy()
    elif kind == 1:  # noise around a colour
        image = c0 + rng.normal(0.0, rng.uniform(5, 30), size=(height, width, 3))
    else:  # linear gradient between two colours in a random direction
        c1 = rng.uniform(0, 255, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    image = np.clip(image, 0, 255)
    return image, image.reshape(-1, 3).mean(axis=0)


def _overlaps_too_much(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    # Intersection over the *smaller* box: allows partial overlap but never hides a small object under a big one.
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in others:
        iw = min(x1, a1) - max(x0, a0) + 1
        ih = min(y1, b1) - max(y0, b0) + 1
        if iw > 0 and ih > 0:
            smaller = min((x1 - x0 + 1) * (y1 - y0 + 1), (a1 - a0 + 1) * (b1 - b0 + 1))
            if iw * ih > 0.3 * smaller:
                return True
    return False


def render_image(rng: np.random.Generator, width: int, height: int, num_objects: int
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one scene. Returns (uint8 (H,W,3) image, int (H,W) instance map with -1 = background, objects).

    ``objects[k]`` owns the pixels where the instance map equals ``k`` and has ``category_id``, ``bbox`` (tight box of
    those pixels, COCO xywh), ``area`` (their count) and ``colour``. Fully hidden objects are left out.
    """
    image, bg_mean = _background(rng, height, width)
    instance = np.full((height, width), -1, dtype=np.int32)
    boxes: list[tuple[int, int, int, int]] = []
    drawn: list[tuple[int, np.ndarray]] = []
    for _ in range(num_objects):
        shape_index = int(rng.integers(0, len(SHAPES)))
        side = rng.uniform(0.12, 0.5) * min(width, height)
        aspect = rng.uniform(0.6, 1.6)
        bw = int(np.clip(side * np.sqrt(aspect), 8, width - 1))
        bh = int(np.clip(side / np.sqrt(aspect), 8, height - 1))
        for _attempt in range(20):
            x0 = int(rng.integers(0, width - bw))
            y0 = int(rng.integers(0, height - bh))
            box = (x0, y0, x0 + bw, y0 + bh)
            if not _overlaps_too_much(box, boxes):
                break
        else:
            continue  # crowded image: fewer objects rather than hidden ones
        mask = draw_shape_mask(SHAPES[shape_index], (height, width), box, rng)
        colour = object_colour(rng, bg_mean)
        image[mask] = colour
        instance[mask] = len(drawn)
        boxes.append(box)
        drawn.append((shape_index, colour))

    objects, remap = [], np.full(len(drawn) + 1, -1, dtype=np.int32)
    for k, (shape_index, colour) in enumerate(drawn):
        visible = instance == k
        if not visible.any():
            continue
        remap[k] = len(objects)
        objects.append({"category_id": CATEGORY_IDS[shape_index], "bbox": mask_to_xywh(visible),
                        "area": int(visible.sum()), "colour": colour.tolist()})
    instance = np.where(instance >= 0, remap[instance], -1)  # indices of dropped objects vanish
    return image.astype(np.uint8), instance, objects


def _renderer(preset: str, min_object_side: int, max_object_scale: float):
    if preset == "cluttered":
        return functools.partial(render_cluttered, min_object_side=min_object_side, max_object_scale=max_object_scale)
    return render_image


def _write_split(out_dir: str, split: str, split_index: int, count: int, seed: int, min_size: int,
                 max_size: int, max_objects: int, empty_every: int, preset: str = "demo",
                 min_object_side: int = 14, max_object_scale: float = 0.95, progress: bool = False) -> str:
    render = _renderer(preset, min_object_side, max_object_scale)
    bar = Progress(count, what="images", prefix=f"generating the synthetic {split} split in {out_dir}: ", bar=False)
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        is_empty = empty_every > 0 and i % empty_every == empty_every - 1
        num_objects = 0 if is_empty else int(rng.integers(1, max_objects + 1))
        pixels, _, objects = render(rng, width, height, num_objects)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(os.path.join(img_dir, file_name), format="PNG")
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": obj["category_id"],
                                "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0})
        if progress:
            bar.update()
    data = {
        "info": {"description": f"sparse-detr synthetic shapes ({preset})", "version": str(GENERATOR_VERSION),
                 "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, SHAPES)],
    }
    ann_file = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return ann_file


def synthetic_paths(out_dir: str) -> dict[str, Any]:
    """``{"root": out_dir, "train": {"img_folder", "ann_file"}, "val": {...}}`` for ``CocoDataset``."""
    return {"root": out_dir, **{split: {"img_folder": os.path.join(out_dir, split),
                                        "ann_file": os.path.join(out_dir, "annotations", f"instances_{split}.json")}
                                for split in SPLITS}}


def make_synthetic_coco(out_dir: str, num_train: int = 64, num_val: int = 16, seed: int = 0, min_size: int = 160,
                        max_size: int = 320, max_objects: int = 6, empty_every: int = 8,
                        preset: str = "demo", min_object_side: int = 14, max_object_scale: float = 0.95,
                        progress: bool = False) -> dict[str, Any]:
    """Write the dataset (see the module docstring) and return ``synthetic_paths(out_dir)``.

    Images have 1..max_objects objects (the ``cluttered`` preset adds distractors), every ``empty_every``-th none.
    ``min_object_side`` (pixels) and ``max_object_scale`` (fraction of the short side): the object size range of
    the ``cluttered`` preset (``demo`` sizes its objects its own way and must keep the defaults).
    ``progress``: a line on stderr every 10% of a split (not a parameter of the data: not in the marker).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; expected one of {PRESETS}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if num_train < 0 or num_val < 0 or max_objects < 0:
        raise ValueError("num_train, num_val and max_objects must be >= 0")
    if min_object_side < 8 or not 0 < max_object_scale <= 1:
        raise ValueError(f"min_object_side={min_object_side}, max_object_scale={max_object_scale}: need >= 8 "
                         f"pixels and a fraction in (0, 1]")
    if preset != "cluttered" and (min_object_side, max_object_scale) != (14, 0.95):
        raise ValueError(f"min_object_side / max_object_scale: only the cluttered preset uses them "
                         f"(preset={preset!r} must keep 14 / 0.95)")
    params = {name: value for name, value in locals().items() if name in _defaults()}
    marker = _claim_folder(out_dir, params)
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        _write_split(out_dir, split, split_index, count, seed, min_size, max_size, max_objects, empty_every, preset,
                     min_object_side, max_object_scale, progress)
    _write_marker(marker, params, complete=True)
    return synthetic_paths(out_dir)


def _defaults() -> dict[str, Any]:
    # Read from make_synthetic_coco itself, so the marker can never disagree with what was generated.
    return {name: p.default for name, p in inspect.signature(make_synthetic_coco).parameters.items()
            if name not in ("out_dir", "progress")}


def _read_marker(marker: str) -> dict | None:
    """The marker's parameters; one it lacks (added to the generator later) reads as its default."""
    try:
        with open(marker, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return {**_defaults(), **data} if isinstance(data, dict) else None


def _write_marker(marker: str, params: dict[str, Any], complete: bool) -> None:
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({**params, "generator_version": GENERATOR_VERSION, "complete": complete}, f, sort_keys=True)


def _claim_folder(out_dir: str, params: dict[str, Any]) -> str:
    """Check that generating into ``out_dir`` overwrites nothing of anyone else's, then mark the folder as ours
    (incomplete) before the first file is written, so an interrupted generation is still recognised as ours."""
    marker = os.path.join(out_dir, MARKER)
    found = _read_marker(marker)
    wanted = {**params, "generator_version": GENERATOR_VERSION}
    if found is not None:
        old = {k: v for k, v in found.items() if k != "complete"}
        if old != wanted:
            diff = ", ".join(f"{k}={old.get(k)!r} (asked {wanted.get(k)!r})" for k in sorted(set(old) | set(wanted))
                             if old.get(k) != wanted.get(k))
            raise SyntheticFolderError(
                f"{out_dir} holds a synthetic dataset made with other parameters ({diff}); it is not regenerated "
                f"in place: delete that folder (it holds only generated data) or choose another data.root / --out")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SyntheticFolderError(
            f"{out_dir} is not empty and has no {MARKER} (the synthetic generator's marker): generating there "
            f"could overwrite files that are not ours; choose a missing or empty folder for data.root / --out")
    os.makedirs(out_dir, exist_ok=True)
    _write_marker(marker, params, complete=False)
    return marker


def ensure_synthetic(out_dir: str, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``make_synthetic_coco(out_dir, **kwargs)`` unless ``out_dir`` already holds it, complete, with the same
    parameters. Raises ``SyntheticFolderError`` for a folder that is not ours (see the module docstring)."""
    defaults = _defaults()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_synthetic: unknown argument(s) {sorted(unknown)}; known: {sorted(defaults)}")
    params = {**defaults, **kwargs}
    paths = synthetic_paths(out_dir)
    found = _read_marker(os.path.join(out_dir, MARKER))
    if (found == {**params, "generator_version": GENERATOR_VERSION, "complete": True}
            and all(os.path.isfile(paths[s]["ann_file"]) for s in SPLITS)):
        return paths
    return make_synthetic_coco(out_dir, **params, progress=progress)
