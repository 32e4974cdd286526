"""Visualisation: PNGs that open, have the documented size and show something (not one flat colour).

A tiny randomly initialised Sparse DETR (ρ = 0.1) is saved as a checkpoint in tmp_path and read back through the
real checkpoint loader (weights_only), as `tools/visualize.py` does.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_detr.config import load_config, to_dict
from sparse_detr.data.coco import LabelMap
from sparse_detr.engine.inference import visualize as vis
from sparse_detr.models import build_model

TINY = ["model.hidden_dim=32", "model.nheads=2", "model.dim_feedforward=64", "model.enc_layers=2",
        "model.dec_layers=2", "model.num_queries=10", "model.num_classes=3", "model.dropout=0.0"]
SPARSE, DENSE = "configs/sparse_detr_r50_rho0.1.yaml", "configs/efficient_detr_r50.yaml"
LABELS = LabelMap([1, 2, 3], ["circle", "square", "triangle"])


def _random_picture(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = (250, 30, 30)  # an "object"
    return Image.fromarray(pixels)


def _tiny(config: str):
    torch.manual_seed(0)
    cfg = load_config(config, TINY)
    model, _, postprocessor = build_model(cfg)
    return cfg, model.eval(), postprocessor


def _check_png(path_or_image, size):
    image = Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image
    image.load()
    assert image.size == size
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not blank, not one flat colour


def test_tool_writes_one_png_per_image(tmp_path):
    cfg, model, _ = _tiny(SPARSE)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"format_version": 1, "model": model.state_dict(), "config": to_dict(cfg),
                "label_map": LABELS.to_dict()}, ckpt)
    folder = tmp_path / "images"
    folder.mkdir()
    _random_picture(0, 96, 64).save(folder / "a.png")
    _random_picture(1, 64, 80).save(folder / "b.jpg")

    written = vis.run_visualization(SPARSE, str(ckpt), str(folder), str(tmp_path / "out"), score_thresh=0.0,
                                    overrides=tuple(TINY), columns=4, panel_width=120, size=64, max_size=128)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["a_vis.png", "b_vis.png"]
    # 7 panels (detections, 4 saliency levels, kept tokens, dam target) in rows of 4: 2 rows.
    # a.png 96x64 -> shown at 96x64, panels 120 wide -> 80 high; b.jpg 64x80 -> 64x80 -> 150 high.
    _check_png(written[0], (4 * 120, 2 * (80 + vis.TITLE_HEIGHT)))
    _check_png(written[1], (4 * 120, 2 * (150 + vis.TITLE_HEIGHT)))


def test_sparse_panels_show_kept_tokens_and_dam_target():
    _, model, post = _tiny(SPARSE)
    panels = vis.make_panels(model, post, _random_picture(2, 96, 64), LABELS, score_thresh=0.0, size=64)
    names = list(panels)
    assert names[0] == "detections" and names[-1] == "dam target"
    # 64x96 -> levels 8x12, 4x6, 2x3, 1x2: 128 tokens, floor(0.1 * 128) + 1 = 13 kept.
    assert [n for n in names if n.startswith("saliency")] == [
        "saliency L0 (8x12)", "saliency L1 (4x6)", "saliency L2 (2x3)", "saliency L3 (1x2)"]
    assert "kept tokens (13/128)" in names
    for panel in panels.values():
        assert panel.size == (96, 64)
    # The kept-token panel marks exactly the kept cells: it differs from the plain greyed picture somewhere.
    kept = np.asarray(panels["kept tokens (13/128)"], dtype=np.int16)
    assert (np.abs(kept[..., 0] - kept[..., 1]) > 40).any()  # coloured cells over a grey picture


def test_dense_model_gets_note_panels_and_keeps_its_mode():
    _, model, post = _tiny(DENSE)
    model.train()
    image = vis.prepare_image(_random_picture(3, 80, 64), size=64)[0]  # the trainer passes normalised tensors
    canvas = vis.visualize_image(model, post, image, LABELS, columns=3, panel_width=90)
    assert model.training  # restored after the eval forward
    # detections, saliency (note), kept tokens (note), selector target (note): 4 panels, 3 per row -> 2 rows.
    _check_png(canvas, (3 * 90, 2 * (72 + vis.TITLE_HEIGHT)))


def test_heatmap_colors_are_monotone_in_brightness():
    colors = vis.heatmap_colors(np.linspace(0, 1, 11)).astype(np.float32)
    brightness = colors.sum(axis=1)
    assert colors.shape == (11, 3) and np.all(np.diff(brightness) > 0)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        vis.list_images(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        vis.list_images(str(tmp_path))  # a folder without images


def test_labels_never_overlap_and_the_best_one_is_drawn():
    """Ten detections piled on one object: the labels drawn do not overlap, the highest score's is among them,
    and its box lies on top."""
    from PIL import Image

    from sparse_detr.engine.inference.visualize import draw_detections

    picture = Image.new("RGB", (200, 150), (90, 90, 90))
    boxes = torch.tensor([[40.0 + i, 50.0 + i, 120.0 + i, 110.0 + i] for i in range(10)])
    scores = torch.linspace(0.3, 0.9, 10).flip(0)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    det = {"boxes": boxes, "scores": scores, "labels": torch.arange(10) % 3}
    panel = draw_detections(picture, det)
    rects = panel.info["label_rects"]
    assert 1 <= len(rects) < 10
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    best = int(scores.argmax())
    first_rect = rects[0]  # the labels are placed best first
    assert first_rect[0] <= boxes[best][0] + 2 and first_rect[1] <= boxes[best][1] + 2
