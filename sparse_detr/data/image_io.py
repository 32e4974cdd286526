"""Reading images: the one loader of training, evaluation, predict and the tools.

Every image comes out as the upright 8-bit RGB picture a viewer shows: the EXIF orientation of a phone photo is
applied (its boxes were drawn on the rotated picture), 16-bit PNGs are scaled to 8 bits (``convert("RGB")`` would
clip them to white), palette, grey and alpha images become RGB. torchvision's decoder does this in one call
(``decode_image(..., mode=RGB, apply_exif_orientation=True)`` then ``to_dtype(uint8, scale=True)``); formats it
cannot decode (BMP, TIFF) go through PIL with the same rules.
"""

from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

from sparse_detr.errors import UserError

__all__ = ["ImageReadError", "read_image", "read_picture", "pil_to_uint8"]

PathLike = Union[str, os.PathLike]


class ImageReadError(UserError, RuntimeError):
    """An image file is missing or cannot be decoded; the message names the file, ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def pil_to_uint8(picture: Image.Image) -> torch.Tensor:
    """A PIL image → (3, H, W) uint8 RGB, upright (EXIF orientation applied), 16-bit and 32-bit integer modes
    scaled from their full range instead of clipped."""
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(picture, dtype=np.int64)
        bits = 16 if picture.mode.startswith("I;16") else 32
        scaled = (np.clip(values, 0, 2 ** bits - 1) >> (bits - 8)).astype(np.uint8)
        picture = Image.fromarray(scaled, mode="L")
    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_image(path: PathLike) -> torch.Tensor:
    """The image file at ``path`` as (3, H, W) uint8 RGB (see the module docstring); ``ImageReadError`` naming
    the file when it is missing or cannot be decoded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(path, "no such file")
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec's; PIL follows
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):  # a format torchvision does not decode, or a damaged file: ask PIL
        try:
            with Image.open(path) as picture:
                return pil_to_uint8(picture)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(path, str(e)) from e
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def read_picture(path: PathLike) -> Image.Image:
    """``read_image`` as a PIL RGB image (for drawing)."""
    return Image.fromarray(read_image(path).permute(1, 2, 0).numpy())
