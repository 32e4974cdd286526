"""`Predictor`: detections on your own images from a trained checkpoint (what `tools/predict.py` runs).

    from sparse_detr import Predictor

    predictor = Predictor.from_checkpoint(None, "outputs/demo_synthetic/checkpoint_best.pth")  # config from the file
    for det in predictor(["a.jpg", "b.png"], score_thresh=0.3):
        print(det["boxes"], det["scores"], det["names"])

Images are file paths, PIL images or (3, H, W) RGB tensors (uint8, or float in [0, 1]). Each is resized by the
config's evaluation transform (`make_transforms(train=False)`: shorter side `data.val_size`, longer side at most
`data.max_size`), normalised, and run in batches of `batch_size` (padded like the evaluation loader, so an image's
scores can differ in the last digits with the batch it is in). Boxes come back in the pixels of the original image.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import tv_tensors

from sparse_detr.config import Config
from sparse_detr.data.coco import LabelMap
from sparse_detr.data.image_io import pil_to_uint8, read_image
from sparse_detr.data.transforms import make_transforms
from sparse_detr.engine.checkpoint import BEST, LAST

__all__ = ["Predictor", "ImageInput", "load_image"]

ImageInput = Union[str, os.PathLike, Image.Image, Tensor]


def load_image(image: ImageInput) -> Tensor:
    """A path, PIL image or (3, H, W) tensor → (3, H, W) uint8 RGB tensor (a float tensor is taken in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)  # upright, 8-bit RGB (data/image_io.py)
    if isinstance(image, Image.Image):
        return pil_to_uint8(image)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.cpu()
        if not image.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 or float in [0, 1], got {image.dtype}")
        return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    raise TypeError(f"an image must be a path, a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


class Predictor:
    """Run a detector on images; see the module docstring.

    Args:
        model, postprocessor: as `build_model` returns them (the weights loaded).
        val_size, max_size: the evaluation resize (the config's `data.val_size`, `data.max_size`).
        label_map: names the labels and maps them to dataset category ids (stored in checkpoints).
        device: where the model runs. bf16: run the model under bfloat16 autocast (boxes and scores are float32).
        batch_size: images per forward pass.
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module, *, val_size: int = 800, max_size: int = 1333,
                 label_map: Optional[LabelMap] = None, device: Union[str, torch.device] = "cpu", bf16: bool = False,
                 batch_size: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"Predictor: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.postprocessor = postprocessor
        self.transform = make_transforms(train=False, val_size=val_size, max_size=max_size)
        self.label_map, self.bf16, self.batch_size = label_map, bf16, batch_size
        self.cfg: Optional[Config] = None

    @classmethod
    def from_checkpoint(cls, config: Union[None, str, Config], checkpoint: str,
                        device: Union[str, torch.device] = "cpu", *, bf16: bool = False, batch_size: int = 4,
                        overrides: Sequence[str] = (), use_ema: bool = False) -> "Predictor":
        """From a checkpoint; `config` None = the config stored in it (given, it must match its architecture)."""
        from sparse_detr.engine.inference.loading import load_for_inference

        loaded = load_for_inference(checkpoint, config, overrides, device="cpu", use_ema=use_ema)
        predictor = cls(loaded.model, loaded.postprocessor, val_size=loaded.cfg.data.val_size,
                        max_size=loaded.cfg.data.max_size, label_map=loaded.label_map, device=device, bf16=bf16,
                        batch_size=batch_size)
        predictor.cfg = loaded.cfg
        return predictor

    @classmethod
    def from_run(cls, run_dir: str, device: Union[str, torch.device] = "cpu", *, checkpoint: str = "best",
                 **kwargs) -> "Predictor":
        """From a training output folder: its best checkpoint (`checkpoint="last"` for the last one; the best
        falls back to the last when the run never evaluated)."""
        if checkpoint not in ("best", "last"):
            raise ValueError(f"Predictor.from_run: checkpoint must be 'best' or 'last', got {checkpoint!r}")
        names = (BEST, LAST) if checkpoint == "best" else (LAST,)
        for name in names:
            path = os.path.join(run_dir, name)
            if os.path.isfile(path):
                return cls.from_checkpoint(None, path, device, **kwargs)
        raise FileNotFoundError(f"no {' or '.join(names)} in {run_dir}")

    def prepare(self, image: ImageInput) -> tuple[Tensor, tuple[int, int]]:
        """(normalised (3, h, w) model input after the evaluation resize, original (H, W))."""
        pixels = load_image(image)
        return self.transform(tv_tensors.Image(pixels)).as_subclass(Tensor), (pixels.shape[-2], pixels.shape[-1])

    @torch.no_grad()
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], score_thresh: float = 0.0
                ) -> Union[dict, list[dict]]:
        """Detections of one image (a dict) or of a list of images (a list of dicts), each with
        `boxes` (n, 4) float32 xyxy in original-image pixels, `scores` (n,) sorted decreasingly, `labels` (n,)
        int64, `names` [n str], `category_ids` (n,) int64 (the label map's ids, -1 for a logit of no category;
        the labels themselves without a label map), `image_size` (H, W) and `input_size` (h, w) the model saw.
        At most 100 detections, those >= score_thresh."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), self.batch_size):
            results += self._predict_batch(items[start:start + self.batch_size], score_thresh)
        return results[0] if single else results

    __call__ = predict

    def _predict_batch(self, batch: list, score_thresh: float) -> list[dict]:
        inputs, sizes = zip(*(self.prepare(image) for image in batch))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model([x.to(self.device) for x in inputs])
        target_sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        results = []
        for det, x, size in zip(self.postprocessor(out, target_sizes), inputs, sizes):
            keep = det["scores"] >= score_thresh
            det = {k: v[keep].float().cpu() if k != "labels" else v[keep].cpu() for k, v in det.items()}
            labels = det["labels"].tolist()
            det["names"] = [self._name(label) for label in labels]
            det["category_ids"] = torch.tensor([self._category(label) for label in labels], dtype=torch.int64)
            det["image_size"], det["input_size"] = size, (x.shape[-2], x.shape[-1])
            results.append(det)
        return results

    def _name(self, label: int) -> str:
        if self.label_map is not None and 0 <= label < len(self.label_map):
            return self.label_map.names[label]
        return str(label)

    def _category(self, label: int) -> int:
        if self.label_map is None:
            return label
        try:
            return self.label_map.to_category_id(label)
        except KeyError:  # a logit of no category (category_id mode: e.g. COCO's 11 unused ids)
            return -1
