"""What the model sees and keeps: detections, the selector's scores per level, the kept tokens, its target map.

`make_panels(model, postprocessor, image, label_map)` runs one image and returns named PIL panels:

    detections      predicted boxes above `score_thresh`, with class names and scores (and the ground truth in
                    white when a target is given)
    saliency L{l}   the selector's sigmoid score on level l (min-max scaled per level) as a heat map
    kept tokens     the tokens the sparse encoder updates (Sec. 3.2: top-ρ), one colour per level; with a
                    per-layer budget (model.rho_layers) one panel per encoder layer whose set differs
    <name> target   the selector's training target (selection.py): the binarised decoder attention map (dam),
                    the foreground mask or the centre salience (these two need the ground truth `target`)

The DAM needs no annotations: it comes from the decoder's cross-attention, which the model computes in eval mode
with `return_maps=True`. Panels that a model cannot have (no scorer in a dense model; no target for the objectness
or random selection) are replaced by a panel that says so, so a grid always has the same layout.
`render_visualization(panels)` tiles them with titles; `visualize_image` does both. The trainer logs the result to
tensorboard; `tools/visualize.py` writes PNGs. Everything is drawn with PIL (no matplotlib).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from sparse_detr.box_ops import box_xyxy_to_cxcywh
from sparse_detr.data.coco import LabelMap
from sparse_detr.data.image_io import pil_to_uint8, read_picture
from sparse_detr.data.transforms import denormalize, make_transforms
from sparse_detr.models.selection import selector_name

__all__ = ["prepare_image", "make_panels", "render_visualization", "visualize_image", "heatmap_colors", "list_images",
           "run_visualization", "draw_detections"]

# One colour per feature level (fine to coarse), also used for the box outlines of the detections.
LEVEL_COLORS = [(230, 60, 60), (60, 200, 90), (70, 120, 240), (240, 200, 40), (200, 80, 220), (40, 210, 220)]
# Anchor colours of the heat map (dark blue -> red -> yellow): readable over photographs and on grey.
_HEAT_ANCHORS = np.array([[0, 0, 80], [80, 0, 160], [200, 30, 60], [250, 140, 0], [255, 255, 120]], np.float32)
TITLE_HEIGHT = 18


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """(...,) values in [0, 1] -> (..., 3) uint8 colours of the heat map."""
    x = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    channels = [np.interp(x, np.arange(len(_HEAT_ANCHORS)), _HEAT_ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def prepare_image(image: Union[Image.Image, Tensor], size: int = 800, max_size: int = 1333
                  ) -> tuple[Tensor, Image.Image]:
    """(normalised (3, h, w) model input, the RGB picture it shows). A PIL image goes through the evaluation
    transform (`make_transforms(train=False)`: shorter side `size`, longer <= `max_size`); a tensor is taken as an
    already normalised model input."""
    if isinstance(image, Tensor):
        pixels = (denormalize(image.detach().float().cpu()) * 255).round().to(torch.uint8)
        return image, Image.fromarray(pixels.permute(1, 2, 0).numpy())
    picture = Image.fromarray(pil_to_uint8(image).permute(1, 2, 0).numpy())  # upright, 8-bit (data/image_io.py)
    x = make_transforms(train=False, val_size=size, max_size=max_size)(tv_tensors.Image(TF.pil_to_tensor(picture)))
    x = x.as_subclass(Tensor)
    return x, picture.resize((x.shape[-1], x.shape[-2]), Image.BILINEAR)


def _level_maps(flat: Tensor, spatial_shapes: Tensor) -> list[np.ndarray]:
    """(S,) per-token values -> one (h_l, w_l) array per level."""
    maps, start = [], 0
    for h, w in spatial_shapes.tolist():
        maps.append(flat[start:start + h * w].reshape(h, w).float().cpu().numpy())
        start += h * w
    return maps


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (h, w) -> size=(W, H): every token stays a visible cell."""
    h, w = grid.shape
    rows = np.minimum((np.arange(size[1]) * h) // size[1], h - 1)
    cols = np.minimum((np.arange(size[0]) * w) // size[0], w - 1)
    return grid[rows][:, cols]


def _blend(picture: Image.Image, colors: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Alpha-blend (H, W, 3) colours with per-pixel alpha (H, W) over a greyed copy of the picture."""
    base = np.asarray(picture.convert("L").convert("RGB"), dtype=np.float32) * 0.6
    a = alpha[..., None]
    return Image.fromarray((base * (1 - a) + colors.astype(np.float32) * a).clip(0, 255).astype(np.uint8))


def _token_panel(picture: Image.Image, selected: list[np.ndarray]) -> Image.Image:
    """Selected tokens (one boolean (h, w) grid per level) as cells coloured by level, with a level legend.
    Coarse levels are blended first and more transparently, so the fine cells on top stay readable and a coarse
    cell does not hide what lies under it."""
    canvas = np.asarray(picture.convert("L").convert("RGB"), dtype=np.float32) * 0.6
    for lvl in reversed(range(len(selected))):
        on = _upsample(selected[lvl].astype(bool), picture.size)
        alpha = 0.85 * 0.7 ** lvl
        canvas[on] = canvas[on] * (1 - alpha) + np.asarray(LEVEL_COLORS[lvl % len(LEVEL_COLORS)]) * alpha
    panel = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw, font = ImageDraw.Draw(panel), _font(10)
    for lvl in range(len(selected)):
        x, y = 3 + 26 * lvl, panel.height - 13
        draw.rectangle((x, y, x + 8, y + 8), fill=LEVEL_COLORS[lvl % len(LEVEL_COLORS)])
        draw.text((x + 10, y - 2), f"L{lvl}", fill=(255, 255, 255), font=font)
    return panel


def _note_panel(picture: Image.Image, text: str) -> Image.Image:
    panel = Image.fromarray((np.asarray(picture.convert("L").convert("RGB"), np.float32) * 0.35).astype(np.uint8))
    ImageDraw.Draw(panel).multiline_text((8, 8), text, fill=(255, 255, 255), font=_font(14))
    return panel


def _label_name(label: int, label_map: Optional[Union[LabelMap, dict]]) -> str:
    if isinstance(label_map, dict):
        label_map = LabelMap.from_dict(label_map)
    if label_map is not None and 0 <= label < len(label_map):
        return label_map.names[label]
    return str(label)


def draw_detections(picture: Image.Image, det: dict, score_thresh: float = 0.0, label_map=None,
                    target: Optional[dict] = None) -> Image.Image:
    """A copy of `picture` with the detections (`boxes` xyxy pixels of the picture, `labels`, `scores`) at or above
    `score_thresh` drawn with their class names and scores, and the optional ground truth in white.

    Boxes are drawn from the lowest score up, so the best box lies on top; labels from the highest score down, each
    at the first of a few places by its box (above, inside, below) where it overlaps no label drawn before: a
    label that would hide a better one is left out (``label_rects`` lists the drawn ones)."""
    panel = picture.copy()
    draw, font = ImageDraw.Draw(panel), _font(12)
    if target is not None:  # ground truth (xyxy pixels of the shown picture) in white, under the predictions
        for box in target["boxes"].tolist():
            draw.rectangle(box, outline=(255, 255, 255), width=1)
    keep = det["scores"] >= score_thresh
    rows = sorted(zip(det["scores"][keep].tolist(), det["boxes"][keep].tolist(), det["labels"][keep].tolist()),
                  key=lambda r: -r[0])
    for score, box, label in reversed(rows):
        draw.rectangle(box, outline=LEVEL_COLORS[label % len(LEVEL_COLORS)], width=2)
    placed: list[tuple[float, float, float, float]] = []
    for score, box, label in rows:
        text = f"{_label_name(label, label_map)} {score:.2f}"
        for x, y in ((box[0], box[1] - 14), (box[0] + 2, box[1] + 2), (box[0], box[3] + 2)):
            x, y = min(max(0, x), panel.width - 1), min(max(0, y), panel.height - 1)
            rect = draw.textbbox((x, y), text, font=font)
            if not any(rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in placed):
                draw.rectangle(rect, fill=LEVEL_COLORS[label % len(LEVEL_COLORS)])
                draw.text((x, y), text, fill=(0, 0, 0), font=font)
                placed.append(rect)
                break
    panel.info["label_rects"] = placed
    return panel


@torch.no_grad()
def make_panels(model: nn.Module, postprocessor: nn.Module, image: Union[Image.Image, Tensor],
                label_map: Optional[Union[LabelMap, dict]] = None, score_thresh: float = 0.3,
                target: Optional[dict] = None, size: int = 800, max_size: int = 1333) -> dict[str, Image.Image]:
    """Run `model` on one image (PIL, or a normalised (3, H, W) tensor) and draw the panels listed in the module
    docstring. `target`: optional {"boxes": (T, 4) xyxy pixels of the shown image} drawn as ground truth.
    A PIL image is first resized to shorter side `size`, longer side <= `max_size` (the val transform).
    The model's train/eval mode is restored afterwards; a DDP wrapper is unwrapped."""
    net = getattr(model, "module", model)
    device = next(net.parameters()).device
    x, picture = prepare_image(image, size, max_size)
    was_training = net.training
    net.eval()
    try:
        out = net([x.to(device)], return_maps=True)
    finally:
        net.train(was_training)
    size = torch.tensor([[picture.height, picture.width]], device=device)
    det = {k: v.cpu() for k, v in postprocessor(out, size)[0].items()}
    panels = {"detections": draw_detections(picture, det, score_thresh, label_map, target)}

    shapes = out["spatial_shapes"]
    selection = out.get("selection")
    scores = selection.scores if selection is not None else None
    if scores is None:
        note = "dense encoder (rho = 0):\nno token scorer,\nevery token is updated"
        panels["saliency"] = _note_panel(picture, note)
        panels["kept tokens"] = _note_panel(picture, note)
    else:
        for lvl, grid in enumerate(_level_maps(scores[0].sigmoid(), shapes)):
            # Min-max per level: the levels' score ranges differ, and the ranking within a level is what matters.
            span = float(grid.max() - grid.min())
            norm = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
            heat = heatmap_colors(_upsample(norm, picture.size))
            panels[f"saliency L{lvl} ({grid.shape[0]}x{grid.shape[1]})"] = _blend(
                picture, heat, np.full(heat.shape[:2], 0.65, np.float32))
        previous = None
        for layer, (indices, valid) in enumerate(zip(selection.layer_indices, selection.layer_valid)):
            count = int(valid[0].sum())
            if count == previous:  # the same set as the layer before (no cascade): one panel for all of them
                continue
            previous = count
            kept = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            kept[indices[0][valid[0]]] = True
            title = "kept tokens" if layer == 0 else f"kept tokens, encoder layer {layer}"
            panels[f"{title} ({count}/{scores.shape[1]})"] = _token_panel(picture, _level_maps(kept, shapes))
    selector = getattr(net, "selector", None)
    gt = None
    if target is not None:  # xyxy pixels of the shown image -> normalised cxcywh, what the criterion sees
        xyxy = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([picture.width, picture.height] * 2, dtype=torch.float32)
        gt = [{"boxes": box_xyxy_to_cxcywh(xyxy / scale).to(device)}]
    target_map = selector.target(out, gt) if selector is not None else None
    if target_map is None:
        note = ("no target map:\ndense encoder" if selector is None else
                f"no target map for {selector_name(selector)}\n(foreground / salience\nneed ground-truth boxes)")
        panels["selector target"] = _note_panel(picture, note)
    elif bool(((target_map == 0) | (target_map == 1)).all()):
        panels[f"{selector_name(selector)} target"] = _token_panel(picture, _level_maps(target_map[0] > 0.5, shapes))
    else:
        heat = heatmap_colors(_upsample(_level_maps(target_map[0], shapes)[0], picture.size))
        panels[f"{selector_name(selector)} target (L0)"] = _blend(picture, heat, np.full(heat.shape[:2], 0.65,
                                                                                           np.float32))
    return panels


def render_visualization(panels: dict[str, Image.Image], columns: int = 4, panel_width: int = 400) -> Image.Image:
    """Tile the panels left to right, `columns` per row, each scaled to `panel_width` with its title above.
    Size: (columns' panels) x panel_width wide, rows x (panel height + TITLE_HEIGHT) high."""
    first = next(iter(panels.values()))
    panel_height = max(1, round(first.height * panel_width / first.width))
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * panel_width, rows * (panel_height + TITLE_HEIGHT)), (24, 24, 24))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    for i, (title, panel) in enumerate(panels.items()):
        x, y = (i % columns) * panel_width, (i // columns) * (panel_height + TITLE_HEIGHT)
        canvas.paste(panel.resize((panel_width, panel_height), Image.BILINEAR), (x, y + TITLE_HEIGHT))
        draw.text((x + 4, y + 3), title, fill=(235, 235, 235), font=font)
    return canvas


def visualize_image(model: nn.Module, postprocessor: nn.Module, image: Union[Image.Image, Tensor],
                    label_map=None, score_thresh: float = 0.3, target: Optional[dict] = None,
                    columns: int = 4, panel_width: int = 400, size: int = 800, max_size: int = 1333) -> Image.Image:
    """`make_panels` then `render_visualization`: one PIL image per input image."""
    panels = make_panels(model, postprocessor, image, label_map, score_thresh, target, size, max_size)
    return render_visualization(panels, columns=columns, panel_width=panel_width)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(path: str) -> list[str]:
    """A single image file, or the images of a folder sorted by name."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no image file or folder at {path}")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return files


def run_visualization(config: Optional[str], checkpoint: str, images: str, out_dir: str, score_thresh: float = 0.3,
                      device: str = "cpu", overrides: tuple = (), max_images: int = 0, columns: int = 4,
                      panel_width: int = 400, size: Optional[int] = None, max_size: Optional[int] = None
                      ) -> list[str]:
    """Load `checkpoint` (weights_only) with `config` (None = the config stored in it; given, checked against it),
    write one PNG per image into `out_dir`. Returns the written paths. `size` / `max_size` default to the config's
    evaluation resize (data.val_size / data.max_size); the label map stored in the checkpoint names the classes."""
    from sparse_detr.engine.inference.loading import load_for_inference

    loaded = load_for_inference(checkpoint, config, overrides, device=device)
    size = size or loaded.cfg.data.val_size
    max_size = max_size or loaded.cfg.data.max_size
    files = list_images(images)[:max_images or None]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in files:
        picture = read_picture(path)
        canvas = visualize_image(loaded.model, loaded.postprocessor, picture, loaded.label_map, score_thresh,
                                 columns=columns, panel_width=panel_width, size=size, max_size=max_size)
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_vis.png")
        canvas.save(out)
        written.append(out)
    return written
