"""Predict on image files and write the results (what `tools/predict.py` runs).

`predict_files(predictor, files, out_dir)` writes into `out_dir`:

    detections.json   COCO results format: [{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}]
    images.json       a COCO skeleton of the inputs ({"images": [{id, file_name, width, height}], "categories",
                      "annotations": []}), so `COCO("images.json").loadRes("detections.json")` works
    <stem>_det.png    each image with its detections at or above the score threshold drawn

Image ids come from `ann_file` (a COCO json that lists the images by file name: the detections can then be
evaluated against it) or are 1..N in input order. Nothing is overwritten unless `overwrite=True`; the json files
are written atomically. An image that cannot be read, or whose size differs from the one `ann_file` gives it (a
json of another split), is skipped with its reason (`skipped` in the result, `skipped.json`): the others are
written.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from PIL import Image

from sparse_detr.data.image_io import ImageReadError, read_image

from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.inference.predictor import Predictor
from sparse_detr.engine.inference.visualize import draw_detections
from sparse_detr.progress import Progress

__all__ = ["predict_files"]


def _image_ids(files: Sequence[str], ann_file: Optional[str]) -> tuple[list[int], list[Optional[tuple]]]:
    """Image ids, and the (height, width) ``ann_file`` gives each file (None without it)."""
    if ann_file is None:
        return list(range(1, len(files) + 1)), [None] * len(files)
    with open(ann_file, "r", encoding="utf-8") as f:
        images = json.load(f).get("images", [])
    by_name = {os.path.basename(im["file_name"]): im for im in images}
    missing = [os.path.basename(p) for p in files if os.path.basename(p) not in by_name]
    if missing:
        raise ValueError(f"{ann_file} lists no image named {missing[0]} ({len(missing)} of the {len(files)} inputs "
                         "are not in it)")
    listed = [by_name[os.path.basename(p)] for p in files]
    return ([int(im["id"]) for im in listed],
            [(int(im["height"]), int(im["width"])) if "height" in im and "width" in im else None for im in listed])


def _write_json_atomic(path: str, data) -> None:
    write_atomic(path, lambda f: json.dump(data, f))


def predict_files(predictor: Predictor, files: Sequence[str], out_dir: str, score_thresh: float = 0.3,
                  ann_file: Optional[str] = None, draw: bool = True, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Run `predictor` on `files`, write the outputs listed in the module docstring. `score_thresh` applies to the
    drawings and the json alike. Returns {"detections": path, "images": path, "drawn": [paths], "count": n}."""
    files = list(files)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"two inputs are named {dup!r}: their drawings would overwrite each other")
    ids, listed_sizes = _image_ids(files, ann_file)
    det_path, img_path = os.path.join(out_dir, "detections.json"), os.path.join(out_dir, "images.json")
    drawn_paths = [os.path.join(out_dir, f"{s}_det.png") for s in stems] if draw else []
    existing = [p for p in [det_path, img_path] + drawn_paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} output files would be overwritten): choose "
                              "another --out or pass --force")
    os.makedirs(out_dir, exist_ok=True)

    results, images, skipped = [], [], []
    bar = Progress(len(files)) if progress else None
    for start in range(0, len(files), predictor.batch_size):
        chunk, loaded = range(start, min(start + predictor.batch_size, len(files))), []
        for i in chunk:  # one unreadable or mislisted file is skipped, not the whole run
            try:
                pixels = read_image(files[i])
            except ImageReadError as e:
                skipped.append({"file": files[i], "reason": e.reason})
                continue
            if listed_sizes[i] is not None and tuple(pixels.shape[-2:]) != listed_sizes[i]:
                skipped.append({"file": files[i], "reason": f"{ann_file} gives image id {ids[i]} the size "
                                f"{listed_sizes[i][1]}x{listed_sizes[i][0]}, the file is "
                                f"{pixels.shape[-1]}x{pixels.shape[-2]} (a json of another split?)"})
                continue
            loaded.append((i, pixels))
        dets = predictor.predict([p for _, p in loaded], score_thresh=score_thresh) if loaded else []
        for (i, pixels), det in zip(loaded, dets):
            height, width = det["image_size"]
            images.append({"id": ids[i], "file_name": os.path.basename(files[i]), "width": width, "height": height})
            for box, score, category in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                            det["category_ids"].tolist()):
                if category < 0:  # a logit that is no category of the dataset
                    continue
                x0, y0, x1, y1 = box
                results.append({"image_id": ids[i], "category_id": int(category), "score": round(score, 5),
                                "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]})
            if draw:
                picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
                draw_detections(picture, det, score_thresh, predictor.label_map).save(drawn_paths[i])
        if bar is not None:
            bar.update(len(chunk))

    label_map = predictor.label_map
    categories = ([{"id": c, "name": n} for c, n in zip(label_map.category_ids, label_map.to_dict()["names"])]
                  if label_map is not None else
                  [{"id": c, "name": str(c)} for c in sorted({r["category_id"] for r in results})])
    _write_json_atomic(img_path, {"images": images, "annotations": [], "categories": categories})
    _write_json_atomic(det_path, results)
    if skipped:
        _write_json_atomic(os.path.join(out_dir, "skipped.json"), skipped)
    done = {os.path.basename(im["file_name"]) for im in images}
    drawn = [p for p, f in zip(drawn_paths, files) if os.path.basename(f) in done]
    return {"detections": det_path, "images": img_path, "drawn": drawn, "count": len(results),
            "predicted": len(images), "skipped": skipped}
