"""Predictor, tools/predict.py, and the config-from-checkpoint loading shared by every tool.

The resize every tool feeds the model is checked against the evaluation transform's rule written out here (shorter
side data.val_size, longer side at most data.max_size, sizes truncated); boxes against a stub model whose normalised
boxes are known, so their original-pixel values are plain arithmetic.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from sparse_detr import Predictor
from sparse_detr.config import ConfigError, load_config, to_dict
from sparse_detr.data.coco import LabelMap
from sparse_detr.data.synthetic import make_synthetic_coco
from sparse_detr.engine.checkpoint import ConfigMismatchError
from sparse_detr.engine.inference.loading import load_for_inference
from sparse_detr.models import SparseDETR, build_model
from sparse_detr.models.postprocess import PostProcess

DEMO = "configs/demo_synthetic.yaml"  # val_size 288, max_size 400
TINY = ["model.hidden_dim=32", "model.nheads=2", "model.dim_feedforward=64", "model.enc_layers=1",
        "model.dec_layers=1", "model.num_queries=20"]
LABELS = LabelMap([1, 3, 5, 7, 9, 11], ["circle", "square", "triangle", "star", "cross", "ring"])


def eval_size(height: int, width: int, val_size: int = 288, max_size: int = 400) -> tuple[int, int]:
    scale = min(val_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


def _checkpoint(folder, name="checkpoint_last.pth", overrides=TINY, seed=0, **extra) -> str:
    torch.manual_seed(seed)
    cfg = load_config(DEMO, list(overrides))
    model, _, _ = build_model(cfg)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    torch.save({"format_version": 1, "model": model.state_dict(), "config": to_dict(cfg),
                "label_map": LABELS.to_dict(), **extra}, path)
    return path


def _picture(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def input_sizes(monkeypatch):
    """The (h, w) of every image the detector is called with (whichever tool builds it)."""
    sizes = []
    forward = SparseDETR.forward

    def spy(self, images, *args, **kwargs):
        sizes.extend(tuple(im.shape[-2:]) for im in images)
        return forward(self, images, *args, **kwargs)

    monkeypatch.setattr(SparseDETR, "forward", spy)
    return sizes


class StubDetector(torch.nn.Module):
    """Fixed predictions: query q of image b has box (cx, cy, w, h) = BOXES[q] and a single class q with logit
    2 - q; records the batches it is called with."""

    BOXES = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1], [0.9, 0.1, 0.2, 0.2]])

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images):
        self.calls.append([tuple(im.shape) for im in images])
        q = len(self.BOXES)
        logits = torch.full((len(images), q, len(LABELS)), -20.0)
        for i in range(q):
            logits[:, i, i] = 2.0 - i
        return {"pred_logits": logits, "pred_boxes": self.BOXES.expand(len(images), q, 4)}


def test_predictor_boxes_in_original_pixels_names_and_batches():
    stub = StubDetector()
    predictor = Predictor(stub, PostProcess(100), val_size=288, max_size=400, label_map=LABELS, batch_size=2)
    pictures = [_picture(0, 150, 200), _picture(1, 100, 320), torch.rand(3, 60, 50)]
    dets = predictor(pictures, score_thresh=0.5)

    assert [len(c) for c in stub.calls] == [2, 1]  # batches of 2
    assert [c[1:] for call in stub.calls for c in call] == [(288, 384), (125, 400), (345, 288)]
    for det, (h, w) in zip(dets, [(150, 200), (100, 320), (60, 50)]):
        assert det["image_size"] == (h, w)
        # sigmoid(2) = 0.88, sigmoid(1) = 0.73, sigmoid(0) = 0.5: all three kept at 0.5, in this order
        assert det["labels"].tolist() == [0, 1, 2]
        assert det["names"] == ["circle", "square", "triangle"]
        assert det["category_ids"].tolist() == [1, 3, 5]
        torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([2.0, 1.0, 0.0])))
        cx, cy, bw, bh = StubDetector.BOXES.unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(det["boxes"], expected)
    single = predictor(pictures[0], score_thresh=0.8)  # one image in, one dict out
    assert isinstance(single, dict) and single["labels"].tolist() == [0]


def test_predictor_from_run_feeds_eval_size_and_batching_changes_nothing(tmp_path, input_sizes):
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_last.pth", seed=0)
    best = _checkpoint(run, "checkpoint_best.pth", seed=1)
    predictor = Predictor.from_run(str(run), batch_size=1)
    assert predictor.cfg.model.hidden_dim == 32  # the config stored in the checkpoint
    reference = load_for_inference(best)  # from_run takes the best checkpoint
    for (name, p), (_, q) in zip(predictor.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(p, q), name

    pictures = [_picture(i, 150, 200) for i in range(3)]
    one_by_one = predictor(pictures, score_thresh=0.0)
    assert input_sizes == [eval_size(150, 200)] * 3 == [(288, 384)] * 3
    predictor.batch_size = 2  # same-size images: batching adds no padding, so nothing may change
    batched = predictor(pictures, score_thresh=0.0)
    for a, b in zip(one_by_one, batched):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)
    bf16 = Predictor.from_run(str(run), bf16=True)(pictures[0], score_thresh=0.0)
    assert bf16["scores"].dtype == torch.float32 and torch.isfinite(bf16["boxes"]).all()


def test_predict_tool_on_synthetic_val_folder(tmp_path, input_sizes, capsys):
    import tools.predict as tool

    paths = make_synthetic_coco(str(tmp_path / "data"), num_train=0, num_val=3, min_size=96, max_size=200)
    val = paths["val"]
    ckpt = _checkpoint(tmp_path / "run")
    out = tmp_path / "pred"
    written = tool.main(["--checkpoint", ckpt, "--images", val["img_folder"], "--out", str(out),
                         "--ann-file", val["ann_file"], "--score-thresh", "0.0", "--batch-size", "2"])

    gt = COCO(val["ann_file"])
    files = sorted(os.listdir(val["img_folder"]))
    originals = [Image.open(os.path.join(val["img_folder"], f)).size for f in files]  # (w, h)
    assert input_sizes == [eval_size(h, w) for w, h in originals]

    results = gt.loadRes(written["detections"])  # pycocotools accepts the json
    assert len(results.getAnnIds()) == written["count"] == 3 * 100
    assert set(results.getImgIds()) == set(gt.getImgIds())
    assert {a["category_id"] for a in results.loadAnns(results.getAnnIds())} <= set(LABELS.category_ids)
    skeleton = COCO(written["images"]).loadRes(written["detections"])  # without an annotation file too
    assert len(skeleton.getAnnIds()) == 300
    for path, size in zip(written["drawn"], originals):
        with Image.open(path) as im:
            assert im.size == size
    assert "3/3 images" in capsys.readouterr().err  # the progress bar

    with pytest.raises(FileExistsError, match="--force"):  # nothing is overwritten without --force
        tool.main(["--checkpoint", ckpt, "--images", val["img_folder"], "--out", str(out)])


def test_visualize_tool_feeds_eval_size_without_config(tmp_path, input_sizes, capsys):
    from tools.visualize import main

    ckpt = _checkpoint(tmp_path / "run")
    folder = tmp_path / "images"
    folder.mkdir()
    _picture(0, 150, 200).save(folder / "a.png")
    _picture(1, 100, 320).save(folder / "b.png")
    written = main(["--checkpoint", ckpt, "--images", str(folder), "--out", str(tmp_path / "vis")])
    assert len(written) == 2
    assert input_sizes == [eval_size(150, 200), eval_size(100, 320)] == [(288, 384), (125, 400)]
    assert capsys.readouterr().out.strip() == f"wrote 2 picture(s) to {tmp_path / 'vis'}: a_vis.png, b_vis.png"


def test_every_tool_gets_the_same_short_report_for_a_wrong_config(tmp_path):
    """A config of another architecture: one short message naming the fields, before any data is read (the
    config points at a COCO folder that does not exist)."""
    ckpt = _checkpoint(tmp_path / "run")
    import tools.eval as eval_tool
    import tools.export_onnx as export_tool
    import tools.predict as predict_tool
    import tools.visualize as vis_tool

    calls = [
        lambda: eval_tool.main(["--config", DEMO, "--checkpoint", ckpt, "data.dataset=coco",
                                f"data.root={tmp_path / 'no_coco'}"]),
        lambda: predict_tool.main(["--config", DEMO, "--checkpoint", ckpt, "--images", ckpt, "--out",
                                   str(tmp_path / "p")]),
        lambda: vis_tool.main(["--config", DEMO, "--checkpoint", ckpt, "--images", ckpt, "--out",
                               str(tmp_path / "v")]),
        lambda: export_tool.main(["--config", DEMO, "--checkpoint", ckpt, "--out", str(tmp_path / "m.onnx")]),
    ]
    messages = []
    for call in calls:
        with pytest.raises(ConfigMismatchError) as err:
            call()
        messages.append(str(err.value))
    assert len(set(messages)) == 1  # the same report everywhere
    assert "model.hidden_dim" in messages[0] and len(messages[0]) < 1000
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "m.onnx")


def test_weights_that_do_not_fit_get_a_short_report(tmp_path):
    """No stored config (e.g. converted weights): the weights themselves are compared, in a few lines."""
    torch.manual_seed(0)
    model, _, _ = build_model(load_config(DEMO, TINY))
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ConfigError, match="pass --config"):
        load_for_inference(str(path))
    with pytest.raises(ConfigMismatchError) as err:
        load_for_inference(str(path), DEMO)  # d = 128 against weights of d = 32
    message = str(err.value)
    assert "of another shape" in message and message.count("\n") < 8
    assert load_for_inference(str(path), DEMO, TINY).cfg.model.hidden_dim == 32  # the right config loads


def test_predict_writes_what_it_could_and_lists_what_it_skipped(tmp_path, capsys):
    """An unreadable file, and a file whose size differs from the one --ann-file gives it (a json of another
    split), are skipped with their reason; the other images are predicted and written."""
    import json

    import tools.predict as tool
    from sparse_detr.engine.cli import run_tool

    paths = make_synthetic_coco(str(tmp_path / "data"), num_train=0, num_val=3, min_size=96, max_size=200)
    val = paths["val"]
    files = sorted(os.listdir(val["img_folder"]))
    (tmp_path / "data" / "val" / files[0]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    listed = json.loads(open(val["ann_file"]).read())
    listed["images"][1]["width"] += 7  # the json of "another split": this file's size does not match
    other = tmp_path / "other.json"
    other.write_text(json.dumps(listed))
    ckpt = _checkpoint(tmp_path / "run")
    out = tmp_path / "pred"
    assert run_tool(tool.main, ["--checkpoint", ckpt, "--images", val["img_folder"], "--out", str(out),
                                "--ann-file", str(other), "--score-thresh", "0.0"]) == 0
    written = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in written["images"]] == files[2:]
    skipped = json.loads((out / "skipped.json").read_text())
    assert [os.path.basename(s["file"]) for s in skipped] == files[:2]
    assert "another split" in skipped[1]["reason"]
    err = capsys.readouterr().err
    assert "2 image(s) skipped" in err and files[0] in err
    assert sorted(p.name for p in out.glob("*_det.png")) == [os.path.splitext(files[2])[0] + "_det.png"]
