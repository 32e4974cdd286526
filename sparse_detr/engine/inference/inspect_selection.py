"""How good is a checkpoint's token selection? Its instruments next to the DAM oracle, random and ground truth.

For the same model and images, four selections of the same budget (k_b tokens of image b; a dense model: ρ =
``reference_rho``) are measured with ``models/instruments.py``:

    own          what the model keeps (its scorer / criterion); absent for a dense model
    DAM oracle   the top-k_b of the decoder attention map (the best any selection of this budget can do)
    random       one uniform draw (seeded), next to the exact expectation
    GT centres   the top-k_b of the ground-truth centre map (Salience-DETR's target; with annotations only)

and drawn, one PNG per image: the DAM as a heat map with the boxes, then each selection's kept tokens.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from sparse_detr.box_ops import box_cxcywh_to_xyxy
from sparse_detr.data.image_io import read_picture
from sparse_detr.engine.inference.visualize import (_blend, _level_maps, _token_panel, _upsample, heatmap_colors, list_images,
                                          prepare_image, render_visualization)
from sparse_detr.models.dam import token_levels
from sparse_detr.models.instruments import (REFERENCE_RHO, InstrumentMeter, instrument_map, selection_instruments)
from sparse_detr.models.selection import _counts, salience_target, top_count_mask

__all__ = ["inspect_selection", "format_inspection", "SELECTIONS"]

SELECTIONS = ("own", "DAM oracle", "random", "GT centres")
COLUMNS = (("dam_coverage", "DAM coverage"), ("object_coverage", "object coverage"),
           ("fg_precision", "fg precision"))


def _annotations(ann_file: str) -> dict[str, tuple[tuple[int, int], list]]:
    """file name → ((height, width), [xywh boxes in pixels]) of a COCO json."""
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    try:
        images = {im["id"]: (im["file_name"], (int(im["height"]), int(im["width"]))) for im in data["images"]}
        boxes: dict[int, list] = {i: [] for i in images}
        for a in data.get("annotations", []):
            if not a.get("iscrowd", 0):
                boxes[a["image_id"]].append(a["bbox"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann_file}: not a COCO detection json (missing or malformed {e})") from None
    return {os.path.basename(name): (hw, boxes[i]) for i, (name, hw) in images.items()}


def _target(hw: tuple[int, int], boxes: list, device: torch.device) -> dict:
    """COCO xywh pixel boxes → the normalised cxcywh target the instruments read."""
    h, w = hw
    xywh = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.cat((xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]), 1) / torch.tensor([w, h, w, h])
    return {"boxes": cxcywh.to(device), "orig_size": torch.tensor([h, w])}


def _selections(out: dict, target: Optional[dict], reference_rho: float, generator: torch.Generator,
                ) -> dict[str, torch.Tensor]:
    """(1, S) kept masks of the selections (module docstring) at the model's budget (a dense one: reference_rho)."""
    pad, shapes, starts = out["padding_mask"], out["spatial_shapes"], out["level_start_index"]
    num_tokens = pad.shape[1]
    selection = out.get("selection")
    level_counts = selection.level_counts if selection is not None else None
    counts = selection.counts if selection is not None else _counts((~pad).sum(1), reference_rho, num_tokens)
    levels = token_levels(shapes, num_tokens)

    def top(values: torch.Tensor) -> torch.Tensor:
        if level_counts is None:
            return top_count_mask(values, pad, counts)
        return top_count_mask(values, pad, level_counts, levels, starts)

    chosen = {}
    if selection is not None:
        chosen["own"] = torch.zeros_like(pad).scatter_(1, selection.indices, selection.valid)
    chosen["DAM oracle"] = top(instrument_map(out))
    chosen["random"] = top(torch.rand(pad.shape, generator=generator).to(pad.device))
    if target is not None:
        # Salience plus a tiny random tie-break: tokens outside every box (0) are ranked at random.
        centre = salience_target(pad, shapes, starts, [target])
        chosen["GT centres"] = top(centre + 1e-6 * torch.rand(pad.shape, generator=generator).to(pad.device))
    return chosen


def _dam_panel(picture: Image.Image, dam: torch.Tensor, shapes: torch.Tensor, boxes: Optional[torch.Tensor]
               ) -> Image.Image:
    """The DAM as a density (each level's mass per pixel, summed over levels), square-root scaled, with boxes."""
    density = np.zeros((picture.height, picture.width), np.float64)
    for grid in _level_maps(dam, shapes):
        cell = (picture.width / grid.shape[1]) * (picture.height / grid.shape[0])
        density += _upsample(grid.astype(np.float64) / cell, picture.size)
    norm = np.sqrt(density / density.max()) if density.max() > 0 else density
    panel = _blend(picture, heatmap_colors(norm), np.full(norm.shape, 0.7, np.float32))
    if boxes is not None and len(boxes):
        draw = ImageDraw.Draw(panel)
        scale = torch.tensor([picture.width, picture.height] * 2)
        for x0, y0, x1, y1 in (box_cxcywh_to_xyxy(boxes.cpu()) * scale).tolist():
            draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 255), width=2)
    return panel


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


@torch.no_grad()
def inspect_selection(model: torch.nn.Module, files: Sequence[str], out_dir: Optional[str] = None,
                      ann_file: Optional[str] = None, size: int = 800, max_size: int = 1333,
                      reference_rho: float = REFERENCE_RHO, seed: int = 0) -> dict:
    """Measure (and, with ``out_dir``, draw) the selections of ``model`` on ``files``. Returns {"selections":
    {name: {instrument: value}}, "reference": the DAM-side numbers (oracle, random expectation, concentration),
    "images": n, "written": [paths]}. Annotations (a COCO json whose file names match) add the ground truth."""
    device = next(model.parameters()).device
    annotations = _annotations(ann_file) if ann_file else None
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    meters = {name: InstrumentMeter() for name in SELECTIONS}
    reference = InstrumentMeter()
    written, missing = [], []
    for path in files:
        x, picture = prepare_image(read_picture(path), size, max_size)
        target = None
        if annotations is not None:
            if os.path.basename(path) not in annotations:
                missing.append(os.path.basename(path))
            else:
                target = _target(*annotations[os.path.basename(path)], device)
        out = model([x.to(device)], return_maps=True)
        targets = [target] if target is not None else None
        reference.update(selection_instruments(out, targets, reference_rho))
        chosen = _selections(out, target, reference_rho, generator)
        results = {}
        for name, kept in chosen.items():
            meter = selection_instruments(out, targets, reference_rho, kept=kept)
            meters[name].update(meter)
            results[name] = meter.compute()
        if out_dir is not None:
            shapes = out["spatial_shapes"]
            panels = {"decoder attention map (DAM)": _dam_panel(picture, instrument_map(out)[0], shapes,
                                                                target["boxes"] if target else None)}
            for name, kept in chosen.items():
                r = results[name]
                title = (f"{name} ({int(kept.sum())}): DAM cov {_fmt(r.get('dam_coverage'))}%"
                         + (f", obj {_fmt(r.get('object_coverage'))}%" if target else ""))
                panels[title] = _token_panel(picture, _level_maps(kept[0], shapes))
            os.makedirs(out_dir, exist_ok=True)
            dest = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_selection.png")
            render_visualization(panels, columns=len(panels), panel_width=320).save(dest)
            written.append(dest)
    return {"selections": {n: m.compute() for n, m in meters.items() if m.sums},
            "reference": reference.compute(), "images": len(files), "written": written,
            "unannotated": missing}


def format_inspection(report: dict) -> str:
    """The report of ``inspect_selection`` as a text table (%)."""
    ref = report["reference"]
    lines = [f"{report['images']} image(s); DAM = decoder attention map (aligned splat); values in %",
             f"DAM concentration: 50% of the mass on {_fmt(ref.get('dam_tokens50'))}% of the tokens, 90% on "
             f"{_fmt(ref.get('dam_tokens90'))}%; random selection's expected DAM coverage "
             f"{_fmt(ref.get('dam_random'))}%" + (f", object coverage {_fmt(ref.get('random_object_coverage'))}%"
                                                   if "random_object_coverage" in ref else ""), "",
             f"{'selection':<12}" + "".join(f"{title:>18}" for _, title in COLUMNS)]
    for name, values in report["selections"].items():
        lines.append(f"{name:<12}" + "".join(f"{_fmt(values.get(key)):>18}" for key, _ in COLUMNS))
    own, oracle = report["selections"].get("own"), report["selections"].get("DAM oracle")
    if own and oracle and "dam_random" in ref:
        span = oracle["dam_coverage"] - ref["dam_random"]
        if span > 1e-9:
            lines.append(f"\nscorer efficiency (own − random) / (oracle − random): "
                         f"{_fmt((own['dam_coverage'] - ref['dam_random']) / span)}%")
    if report.get("unannotated"):
        lines.append(f"no annotation for {len(report['unannotated'])} image(s), e.g. {report['unannotated'][0]}")
    return "\n".join(lines)


def run_inspection(checkpoint: str, images: str, out_dir: Optional[str], ann_file: Optional[str] = None,
                   rho: Optional[float] = None, config: Optional[str] = None, overrides: Sequence[str] = (),
                   device: str = "cpu", max_images: int = 0) -> dict:
    """Load ``checkpoint`` and inspect its selection on the images of ``images`` (what tools/inspect_selection.py
    runs). ``rho``: the budget (a sparse model keeps that ratio, ``model.rho``; a dense one is measured there)."""
    from sparse_detr.engine.checkpoint import load_checkpoint
    from sparse_detr.engine.inference.loading import load_for_inference

    if ann_file is not None and not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    files = list_images(images)[:max_images or None]
    stored = load_checkpoint(checkpoint).get("config") or {}
    sparse = float((stored.get("model") or {}).get("rho", 0.0)) > 0
    extra = [f"model.rho={rho}"] if rho is not None and sparse else []
    loaded = load_for_inference(checkpoint, config, list(overrides) + extra, device=device)
    return inspect_selection(loaded.model, files, out_dir, ann_file, loaded.cfg.data.val_size,
                             loaded.cfg.data.max_size, reference_rho=rho if rho is not None else REFERENCE_RHO)
