"""The `cluttered` synthetic preset: deterministic, exact boxes of the visible extent, cluttered as promised,
and kept apart from the demo preset by the generator's marker."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sparse_detr.config import load_config
from sparse_detr.data.cluttered import DISTRACTORS, draw_distractor_mask, render_cluttered, textured_background
from sparse_detr.data.synthetic import CATEGORY_IDS, MARKER, SyntheticFolderError, ensure_synthetic, make_synthetic_coco

SMALL = dict(num_train=4, num_val=2, min_size=96, max_size=128, max_objects=12, preset="cluttered")


def read_tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_coco(str(tmp_path / name), seed=seed, **SMALL)
    make_synthetic_coco(str(tmp_path / "demo"), seed=3, **{**SMALL, "preset": "demo"})
    a, b, c, demo = (read_tree(tmp_path / x) for x in ("a", "b", "c", "demo"))
    assert a == b
    assert a["train/000000.png"] != c["train/000000.png"]
    assert a["train/000000.png"] != demo["train/000000.png"]


@pytest.mark.parametrize("seed,min_object_side", [(s, 14) for s in range(6)] + [(6, 30), (7, 30)])
def test_every_box_is_the_exact_visible_extent(seed, min_object_side):
    image, instance, objects = render_cluttered(np.random.default_rng(seed), 160, 120, num_objects=15,
                                                min_object_side=min_object_side)
    assert image.shape == (120, 160, 3) and instance.shape == (120, 160) and len(objects) >= 5
    assert set(np.unique(instance)) <= set(range(-1, len(objects)))
    for k, obj in enumerate(objects):
        owned = instance == k
        x, y, w, h = obj["bbox"]
        inside = np.zeros_like(owned)
        inside[y:y + h, x:x + w] = True
        assert owned.any() and not (owned & ~inside).any(), "object pixels outside the box"
        # Tight: each of the four border lines of the box holds at least one pixel of the object.
        assert owned[y, x:x + w].any() and owned[y + h - 1, x:x + w].any()
        assert owned[y:y + h, x].any() and owned[y:y + h, x + w - 1].any()
        assert obj["area"] == owned.sum()
        # The instance map describes the saved pixels: objects are flat colour (the background is noisy).
        assert (image[owned] == np.array(obj["colour"], dtype=np.uint8)).all()
        assert obj["category_id"] in CATEGORY_IDS


def _tight_box(owned):
    ys, xs = np.nonzero(owned)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_saved_files_have_the_exact_boxes(tmp_path):
    # Replays the documented per-image RNG (image i of split s draws from default_rng([seed, s, i]) only: its size,
    # its object count, then the scene) to get each saved image's instance map.
    paths = make_synthetic_coco(str(tmp_path), seed=5, **{**SMALL, "empty_every": 0})
    data = json.load(open(paths["val"]["ann_file"]))
    assert "cluttered" in data["info"]["description"] and len(data["images"]) == SMALL["num_val"]
    for i, img in enumerate(data["images"]):
        rng = np.random.default_rng([5, 1, i])
        width, height = (int(v) for v in rng.integers(SMALL["min_size"], SMALL["max_size"] + 1, size=2))
        rendered, instance, _ = render_cluttered(rng, width, height, int(rng.integers(1, SMALL["max_objects"] + 1)))
        saved = np.asarray(Image.open(os.path.join(paths["val"]["img_folder"], img["file_name"])).convert("RGB"))
        assert (saved == rendered).all()
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == instance.max() + 1
        for k, a in enumerate(anns):
            assert a["bbox"] == _tight_box(instance == k) and a["area"] == (instance == k).sum()


def test_cluttered_scenes_have_many_objects_of_all_sizes_and_distractors(tmp_path):
    paths = make_synthetic_coco(str(tmp_path), num_train=24, num_val=0, seed=0, min_size=224, max_size=288,
                                max_objects=20, preset="cluttered")
    data = json.load(open(paths["train"]["ann_file"]))
    areas = np.array([a["area"] for a in data["annotations"]])
    assert len(areas) / len(data["images"]) > 5
    small, large = (areas < 32 ** 2).mean(), (areas >= 96 ** 2).mean()
    assert small > 0.2 and large > 0.05 and 1 - small - large > 0.2  # COCO's three area ranges all present
    # Distractors: a scene without objects still has shapes painted over its background (drawn first from the rng).
    for seed in range(3):
        image, instance, objects = render_cluttered(np.random.default_rng(seed), 128, 128, num_objects=0)
        background = textured_background(np.random.default_rng(seed), 128, 128).astype(np.uint8)
        painted = (image != background).any(-1)
        assert not objects and (instance == -1).all() and painted.mean() > 0.002


def test_min_object_side_shifts_the_size_mix_from_small_to_medium():
    def areas(min_object_side):
        return np.array([o["area"] for seed in range(12) for o in render_cluttered(
            np.random.default_rng(seed), 224, 224, num_objects=10, min_object_side=min_object_side)[2]])

    default, raised = areas(14), areas(32)
    assert (default < 32 ** 2).mean() > 0.3 and (raised < 32 ** 2).mean() < 0.2
    assert ((raised >= 32 ** 2) & (raised < 96 ** 2)).mean() > ((default >= 32 ** 2) & (default < 96 ** 2)).mean()
    # Only the objects' sizes move: a scene's distractors come from the same draws (empty scenes are equal).
    empty = [render_cluttered(np.random.default_rng(1), 96, 96, 0, min_object_side=m)[0] for m in (14, 32)]
    assert (empty[0] == empty[1]).all()


def test_min_object_side_is_checked_and_old_markers_still_match(tmp_path):
    with pytest.raises(ValueError, match="only the cluttered preset uses them"):
        make_synthetic_coco(str(tmp_path / "demo"), preset="demo", min_object_side=30)
    with pytest.raises(ValueError, match="min_object_side=4, max_object_scale=0.95"):
        make_synthetic_coco(str(tmp_path / "tiny"), min_object_side=4, **SMALL)
    # A folder whose marker predates the parameter reads as the default: reused, not refused or rewritten.
    root = str(tmp_path / "old")
    ensure_synthetic(root, **SMALL)
    marker = json.load(open(os.path.join(root, MARKER)))
    del marker["min_object_side"]
    json.dump(marker, open(os.path.join(root, MARKER), "w"))
    before = read_tree(root)
    ensure_synthetic(root, **SMALL)
    assert read_tree(root) == before
    with pytest.raises(SyntheticFolderError, match="min_object_side=14 \\(asked 30\\)"):
        ensure_synthetic(root, **SMALL, min_object_side=30)


@pytest.mark.parametrize("kind", DISTRACTORS)
def test_distractors_stay_in_their_box(kind):
    mask = draw_distractor_mask(kind, (48, 64), (7, 9, 40, 30), np.random.default_rng(2))
    ys, xs = np.nonzero(mask)
    assert mask.any() and xs.min() >= 7 and xs.max() <= 40 and ys.min() >= 9 and ys.max() <= 30


def test_marker_keeps_presets_apart(tmp_path):
    root = str(tmp_path / "syn")
    demo = {**SMALL, "preset": "demo"}
    ensure_synthetic(root, **demo)
    before = read_tree(root)
    with pytest.raises(SyntheticFolderError, match="preset='demo' \\(asked 'cluttered'\\)"):
        ensure_synthetic(root, **SMALL)  # the other preset: refused, nothing rewritten
    assert json.load(open(os.path.join(root, MARKER)))["preset"] == "demo" and read_tree(root) == before
    ensure_synthetic(str(tmp_path / "other"), **SMALL)
    assert read_tree(str(tmp_path / "other"))["train/000000.png"] != before["train/000000.png"]
    with pytest.raises(ValueError, match="unknown synthetic preset 'busy'"):
        make_synthetic_coco(str(tmp_path / "x"), preset="busy")


def test_ablation_config_uses_the_cluttered_preset():
    cfg = load_config("configs/ablation_synthetic.yaml")
    assert cfg.data.dataset == "synthetic" and cfg.data.synthetic.preset == "cluttered"
    assert cfg.data.synthetic.max_objects > 6
    # Its backbone pretraining: the same scenes and backbone, but images the ablation never trains or evaluates on
    # (image i of a split draws from default_rng([seed, split, i]): another seed, other images).
    pre = load_config("configs/ablation_pretrain.yaml")
    assert pre.model.backbone == cfg.model.backbone and pre.model.rho == 0 and not pre.model.use_enc_aux_loss
    same = {k: v for k, v in vars(pre.data.synthetic).items() if k not in ("seed", "num_train", "num_val")}
    assert same == {k: v for k, v in vars(cfg.data.synthetic).items() if k in same}
    assert pre.data.synthetic.seed != cfg.data.synthetic.seed and pre.data.root != cfg.data.root
