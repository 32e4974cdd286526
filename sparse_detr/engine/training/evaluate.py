"""COCO box evaluation: collect post-processed detections, map labels back to category ids, run pycocotools.

We wrap pycocotools' ``COCOeval`` rather than re-implementing it (as torchvision's references do), so our numbers are
COCO's numbers by construction. What this adds: labels -> dataset category ids through the ``LabelMap`` (contiguous
labels, or category ids used as labels, where detections of labels that are no category are dropped), gathering
predictions from all ranks, named metrics instead of a 12-vector, a per-class AP table, zero detections handled
(pycocotools' ``loadRes`` crashes on an empty list), and pycocotools' prints captured instead of spilling into the
log of every rank.

Metric convention (engine/metrics.py): percent (COCOeval's fractions × 100), -1.0 where there is no ground truth for
that area range / class (COCOeval's own sentinel); the dict says so under "ap_unit".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Iterable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_detr.data.coco import LabelMap
from sparse_detr.data.collate import batch_image_sizes
from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.dist import all_gather_object, is_main_process
from sparse_detr.engine.metrics import AP_UNIT, AP_UNIT_KEY, METRIC_NAMES, percent
from sparse_detr.models.instruments import InstrumentMeter, format_instruments, selection_instruments

__all__ = ["METRIC_NAMES", "CocoEvaluator", "evaluate", "load_coco_gt", "format_metrics", "format_per_class_table"]


def load_coco_gt(ann_file: str) -> COCO:
    """pycocotools ``COCO`` for an annotation file, without its "loading annotations..." prints."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _empty_results(coco_gt: COCO) -> COCO:
    # What loadRes([]) would return if it did not index anns[0]: the GT images and categories, no detections.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Accumulates detections per image id and evaluates them against ``coco_gt``.

    ``update({image_id: {"scores" (n,), "labels" (n,) of the label map, "boxes" (n,4) xyxy original pixels}})``;
    then ``synchronize()`` on every rank (collective), then ``summarize()`` where the numbers are wanted.
    """

    def __init__(self, coco_gt: COCO, label_map: LabelMap) -> None:
        self.coco_gt = coco_gt
        self.label_map = label_map
        self.predictions: dict[int, dict[str, np.ndarray]] = {}
        self.coco_eval: COCOeval | None = None
        self.metrics: dict[str, Any] = {}
        self.summary_text = ""

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        for image_id, pred in predictions.items():
            # Keyed by id, so an image seen twice (DistributedSampler pads the last batch) is counted once.
            self.predictions[int(image_id)] = {
                "scores": pred["scores"].detach().float().cpu().numpy(),
                "labels": pred["labels"].detach().cpu().numpy(),
                "boxes": pred["boxes"].detach().float().cpu().numpy(),
            }

    def synchronize(self) -> None:
        """Merge every rank's predictions (``all_gather_object``); a no-op when not distributed."""
        merged: dict[int, dict[str, np.ndarray]] = {}
        for part in all_gather_object(self.predictions):
            merged.update(part)
        self.predictions = merged

    def to_coco_results(self) -> list[dict[str, Any]]:
        """Detections in COCO result format: ``image_id``, ``category_id`` (dataset id), ``bbox`` xywh, ``score``."""
        lookup = self.label_map.label_to_category_array()  # label -> category id, -1 = no category
        identity = self.label_map.mode == "category_id"
        results = []
        for image_id in sorted(self.predictions):
            pred = self.predictions[image_id]
            labels = pred["labels"].astype(np.int64).reshape(-1)
            boxes = pred["boxes"].reshape(-1, 4).astype(np.float64)
            scores = pred["scores"].reshape(-1)
            outside = (labels < 0) | (labels >= len(lookup))
            if identity:
                # Label = category id: a model with 91 logits on COCO's 80 categories can score the 11 unused ids
                # (or ids beyond the json's largest); they are no category of this dataset, so drop them.
                keep = ~outside
                keep[keep] = lookup[labels[keep]] >= 0
                labels, boxes, scores = labels[keep], boxes[keep], scores[keep]
            elif outside.any():
                raise ValueError(f"image id {image_id}: predicted label {int(labels[outside][0])} is outside the "
                                 f"label map's [0, {len(lookup)}); does the model's num_classes match the dataset?")
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            # Boxes rounded to 1/1000 px keep the json small (COCO val: ~500k detections) without changing IoUs.
            for category_id, box, score in zip(lookup[labels], xywh, scores):
                results.append({"image_id": image_id, "category_id": int(category_id),
                                "bbox": [round(float(v), 3) for v in box], "score": float(score)})
        return results

    def save_detections(self, path: str) -> None:
        """Write the COCO-format detections json (atomically: a crash never leaves half a file)."""
        results = self.to_coco_results()
        write_atomic(path, lambda f: json.dump(results, f))

    def summarize(self) -> dict[str, Any]:
        """Run COCOeval; returns the 12 named numbers (percent, or -1), ``per_class`` {name: AP} and the unit."""
        results = self.to_coco_results()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = self.coco_gt.loadRes(results) if results else _empty_results(self.coco_gt)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            if self.predictions:
                # Only the images we ran on (e.g. a subset while debugging); images with no detection still count.
                coco_eval.params.imgIds = sorted(self.predictions)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.summary_text = buffer.getvalue()
        self.coco_eval = coco_eval
        metrics: dict[str, Any] = {name: percent(float(v)) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["per_class"] = self._per_class_ap(coco_eval)
        metrics[AP_UNIT_KEY] = AP_UNIT
        self.metrics = metrics
        return metrics

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        # precision: (IoU thresholds, recall points, classes, area ranges, max dets); area "all" = 0, maxDets 100 = -1.
        precision = coco_eval.eval["precision"]
        table = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            ap = percent(float(p[p > -1].mean())) if (p > -1).any() else -1.0
            table[self.coco_gt.cats[category_id]["name"]] = ap
        return table

    def format_per_class_table(self, columns: int = 3) -> str:
        """The per-class AP (in %) of the last ``summarize()`` as an aligned text table."""
        per_class = self.metrics.get("per_class")
        if per_class is None:
            raise RuntimeError("format_per_class_table: call summarize() first")
        return format_per_class_table(per_class, columns)


def _shown(value: float) -> str:
    return "  n/a" if value < 0 else f"{value:5.1f}"


def format_per_class_table(per_class: dict[str, float], columns: int = 3) -> str:
    """``{name: AP}`` (percent, -1 = no ground truth) as an aligned text table, ``columns`` classes a row."""
    cells = [(name, _shown(ap)) for name, ap in per_class.items()]
    width = max([len("category")] + [len(name) for name, _ in cells])
    header = " | ".join([f"{'category':<{width}}    AP"] * min(columns, max(len(cells), 1)))
    lines = [header, "-" * len(header)]
    for start in range(0, len(cells), columns):
        lines.append(" | ".join(f"{name:<{width}} {ap}" for name, ap in cells[start:start + columns]))
    return "\n".join(lines)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The 12 COCO numbers (percent, -1 shown as n/a) of ``summarize()``, then its per-class AP table if any."""
    lines = ["  ".join(f"{m:>5}" for m in METRIC_NAMES), "  ".join(_shown(metrics[m]) for m in METRIC_NAMES)]
    if metrics.get("per_class"):
        lines += ["", format_per_class_table(metrics["per_class"])]
    if metrics.get("selection"):
        lines += ["", format_instruments(metrics["selection"])]
    return "\n".join(lines)


def evaluate(model: torch.nn.Module, postprocessor: Any, data_loader: Iterable, device: torch.device,
             label_map: LabelMap, coco_gt: COCO, detections_path: str | None = None,
             instruments: bool = True) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``data_loader`` (batches of ``(images, mask, targets)`` from ``collate_batch``).

    ``model(images, mask, image_sizes=...)`` gets the unpadded image sizes as host ints (``batch_image_sizes``).

    Call on every rank (the gather is collective). Returns ``CocoEvaluator.summarize()`` on the main process and
    ``{}`` elsewhere; restores the model's train/eval mode. ``detections_path``: also save the detections json.
    ``instruments``: also the val-set aggregate of the selection instruments under ``"selection"``
    (``models/instruments.py``; dense models at its reference budget).
    """
    was_training = model.training
    model.eval()
    evaluator = CocoEvaluator(coco_gt, label_map)
    meter = InstrumentMeter()
    with torch.no_grad():
        for images, mask, targets in data_loader:
            sizes = batch_image_sizes(targets)  # host ints, before any copy: a tight k without a device sync
            outputs = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                            image_sizes=sizes, **({"return_maps": True} if instruments else {}))
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            results = postprocessor(outputs, target_sizes=orig_sizes)
            evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
            if instruments:
                meter.update(selection_instruments(outputs, targets))
    model.train(was_training)
    evaluator.synchronize()
    states = all_gather_object(meter.state()) if instruments else []
    if not is_main_process():
        return {}
    if detections_path is not None:
        evaluator.save_detections(detections_path)
    metrics = evaluator.summarize()
    if instruments:
        metrics["selection"] = InstrumentMeter.merged(states).compute()
    return metrics
