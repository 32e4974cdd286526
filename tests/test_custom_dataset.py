"""docs/custom_dataset.md, run as written: every `python tools/...` command of the guide, in order, on a small
generated 3-class data set (VOC XML and YOLO labels) fine-tuned from a 6-class demo checkpoint. To keep it short,
the training command gets `train.epochs=1 train.max_iters_per_epoch=2` appended and the export `--no-optimize`
(the graph optimizer is tested in test_export.py)."""
import importlib
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sparse_detr.config import load_config, to_dict
from sparse_detr.engine.cli import run_tool
from sparse_detr.models import build_model

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "custom_dataset.md"
CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python tools/")]


def _make_data(root: Path) -> None:
    """images/{train,val}, voc/{train,val} XML, labels/train YOLO txt and classes.txt: coloured boxes, class by
    colour."""
    gen = torch.Generator().manual_seed(0)
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in (("train", 6), ("val", 3)):
        for sub in ("images", "voc", "labels"):
            (root / sub / split).mkdir(parents=True)
        for i in range(count):
            w, h = 160, 128
            picture = Image.new("RGB", (w, h), (128, 128, 128))
            draw = ImageDraw.Draw(picture)
            objects, yolo = [], []
            for _ in range(3):
                cls = int(torch.randint(0, 3, (1,), generator=gen))
                bw, bh = (int(v) for v in torch.randint(20, 50, (2,), generator=gen))
                x, y = int(torch.randint(0, w - bw, (1,), generator=gen)), int(torch.randint(0, h - bh, (1,),
                                                                                            generator=gen))
                draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill=COLOURS[cls])
                objects.append(f"<object><name>{CLASSES[cls]}</name><difficult>0</difficult><bndbox><xmin>{x + 1}"
                               f"</xmin><ymin>{y + 1}</ymin><xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox>"
                               "</object>")
                yolo.append(f"{cls} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}")
            name = f"{split}_{i}.jpg"
            picture.save(root / "images" / split / name, quality=95)
            (root / "voc" / split / f"{split}_{i}.xml").write_text(
                f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height></size>"
                + "".join(objects) + "</annotation>")
            (root / "labels" / split / f"{split}_{i}.txt").write_text("\n".join(yolo) + "\n")


def _demo_checkpoint(path: Path) -> None:
    """A 6-class model of configs/demo_synthetic.yaml, as the README's demo leaves it."""
    cfg = load_config(str(REPO / "configs" / "demo_synthetic.yaml"))
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)


def test_every_command_of_the_guide_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    os.symlink(REPO / "configs", tmp_path / "configs")
    _make_data(tmp_path / "data" / "mydata")
    _demo_checkpoint(tmp_path / "outputs" / "demo_synthetic" / "checkpoint_best.pth")
    commands = _commands()
    assert [c.split()[1] for c in commands] == [
        "tools/convert_voc.py", "tools/convert_voc.py", "tools/convert_yolo.py", "tools/train.py", "tools/eval.py",
        "tools/predict.py", "tools/inspect_selection.py", "tools/export_onnx.py"]
    for command in commands:
        argv = shlex.split(command)[2:]
        tool = Path(shlex.split(command)[1]).stem
        if tool == "train":
            argv += ["train.epochs=1", "train.max_iters_per_epoch=2"]
        if tool == "export_onnx":
            argv += ["--no-optimize"]
        module = importlib.import_module(f"tools.{tool}")
        assert run_tool(getattr(module, "_checked", module.main), argv) == 0, (command, capsys.readouterr().err)
    out = capsys.readouterr().out
    # The converters agree with each other on the train split (VOC's inclusive indices, YOLO's fractions).
    voc, yolo = (json.loads((tmp_path / "data/mydata/annotations" / n).read_text())
                 for n in ("train.json", "train_from_yolo.json"))
    assert len(voc["annotations"]) == len(yolo["annotations"]) == 18
    for a, b in zip(voc["annotations"], yolo["annotations"]):
        assert a["category_id"] == b["category_id"] and a["bbox"] == pytest.approx(b["bbox"], abs=1e-9)
    log = (tmp_path / "outputs/mydata/log.txt").read_text()
    assert "model.init_weights outputs/demo_synthetic/checkpoint_best.pth: loaded" in log
    for name in CLASSES:  # the per-class table names the classes
        assert re.search(rf"{name}\s+\S+", out), name
    predictions = json.loads((tmp_path / "outputs/mydata/predict/detections.json").read_text())
    assert {p["category_id"] for p in predictions} <= {1, 2, 3}  # the json's ids (a 2-step model finds little)
    images = json.loads((tmp_path / "outputs/mydata/predict/images.json").read_text())
    assert len(images["images"]) == 3 and [c["name"] for c in images["categories"]] == CLASSES
    assert (tmp_path / "outputs/mydata/model.onnx").is_file()
    assert len(list((tmp_path / "outputs/mydata/inspect").glob("*_selection.png"))) == 3
