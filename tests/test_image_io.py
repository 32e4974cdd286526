"""One image loader everywhere (data/image_io.py): EXIF orientation, 16-bit, palette and alpha images, in the
dataset, the Predictor and predict, against pictures whose upright 8-bit content is known by construction."""
import numpy as np
import pytest
import torch
from PIL import Image

from sparse_detr.data.coco import CocoDataset
from sparse_detr.data.image_io import ImageReadError, pil_to_uint8, read_image
from sparse_detr.engine.inference.predictor import load_image

from test_data import ann, write_coco

ORIENTATION = 0x0112


def _marked(height=20, width=30):
    """A black picture with a white block in its top-left corner (rows 0-4, columns 0-9)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:5, :10] = 255
    return pixels


def _save_rotated(path, pixels, orientation=6):
    """Store ``pixels`` with an EXIF orientation: a viewer shows them turned (6: 90 degrees clockwise)."""
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[ORIENTATION] = orientation
    img.save(path, exif=exif.tobytes())


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_gives_the_upright_picture(tmp_path, suffix):
    path = tmp_path / f"photo{suffix}"
    _save_rotated(path, _marked())
    image = read_image(path)
    assert image.shape == (3, 30, 20)  # turned: 20x30 stored, 30 high x 20 wide shown
    upright = torch.from_numpy(np.rot90(_marked(), k=-1).copy()).permute(2, 0, 1)  # 90 degrees clockwise
    assert (image.int() - upright.int()).abs().max() <= (0 if suffix == ".png" else 40)
    assert torch.equal(pil_to_uint8(Image.open(path)), image) or suffix == ".jpg"
    assert torch.equal(load_image(str(path)), image) and load_image(Image.open(path)).shape == (3, 30, 20)


def test_16_bit_palette_and_alpha_images(tmp_path):
    ramp = (np.arange(10 * 12).reshape(10, 12) * 547).astype(np.uint16)  # 0 .. 65 000
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    want = torch.from_numpy((ramp >> 8).astype(np.uint8)).expand(3, -1, -1)
    assert torch.equal(read_image(tmp_path / "deep.png"), want)  # not white: convert("RGB") clips to 255
    assert torch.equal(pil_to_uint8(Image.open(tmp_path / "deep.png")), want)
    pixels = _marked()
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 90, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    for name in ("palette.png", "a.png"):
        assert torch.equal(read_image(tmp_path / name), torch.from_numpy(pixels).permute(2, 0, 1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(tmp_path / "broken.png")


def test_dataset_reads_a_rotated_photo_under_its_boxes(tmp_path):
    """The json describes the upright picture (what annotation tools show): 30 high x 20 wide, with a box on the
    white block, which the rotation moved to the top right."""
    images = [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 30}]
    img_dir, ann_file = write_coco(tmp_path, [ann(1, [15, 0, 5, 10])], images=images, write_images=False)
    _save_rotated(tmp_path / "img" / "a.jpg", _marked())
    ds = CocoDataset(img_folder=img_dir, ann_file=ann_file)
    image = ds.load_image(ds.record(0))
    assert image.shape == (3, 30, 20)
    assert image[:, :10, 15:].float().mean() > 200 and image[:, 10:, :].float().mean() < 30  # block under the box
    # A json with the stored (unrotated) size: an error that names the EXIF orientation.
    images = [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20}]
    img_dir, ann_file = write_coco(tmp_path, [ann(1, [0, 0, 10, 5])], images=images, write_images=False)
    unrotated = CocoDataset(img_folder=img_dir, ann_file=ann_file)
    with pytest.raises(RuntimeError, match="EXIF orientation"):
        unrotated.load_image(unrotated.record(0))
