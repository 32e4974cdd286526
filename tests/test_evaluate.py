"""COCO evaluator: perfect detections give AP 100 % (with contiguous labels and with category ids as labels), numbers
equal a direct pycocotools run, zero detections give 0; the loop hands the model the unpadded image sizes."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from sparse_detr.data import CocoDataset, collate_batch, make_synthetic_coco
from sparse_detr.engine.training.evaluate import METRIC_NAMES, CocoEvaluator, evaluate, load_coco_gt


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """A small synthetic val split (non-contiguous category ids 1, 3, ..., 11) and its COCO api + label map."""
    root = tmp_path_factory.mktemp("syn")
    paths = make_synthetic_coco(str(root), num_train=0, num_val=24, seed=1, min_size=64, max_size=160)["val"]
    dataset = CocoDataset(img_folder=paths["img_folder"], ann_file=paths["ann_file"])
    return load_coco_gt(paths["ann_file"]), dataset


def gt_as_predictions(coco_gt, label_map, jitter=0.0, seed=0):
    """Per image: the ground truth boxes (xyxy pixels, contiguous labels), optionally jittered and with extras."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32)
        labels = np.array([label_map.to_contiguous(a["category_id"]) for a in anns], dtype=np.int64)
        scores = np.ones(len(anns), dtype=np.float32)
        if jitter:
            boxes = boxes.reshape(-1, 4) + rng.normal(0, jitter, size=(len(anns), 4)).astype(np.float32)
            scores = rng.uniform(0.2, 1.0, size=len(anns)).astype(np.float32)
            labels = np.where(rng.random(len(anns)) < 0.15, rng.integers(0, 6, len(anns)), labels)
            extra = rng.uniform(0, 60, size=(3, 2)).astype(np.float32)  # false positives
            boxes = np.concatenate([boxes, np.concatenate([extra, extra + 20], axis=1)])
            scores = np.concatenate([scores, rng.uniform(0, 1, 3).astype(np.float32)])
            labels = np.concatenate([labels, rng.integers(0, 6, 3)])
        predictions[image_id] = {"scores": torch.from_numpy(scores), "labels": torch.from_numpy(labels),
                                 "boxes": torch.from_numpy(boxes.reshape(-1, 4))}
    return predictions


def test_ground_truth_as_detections_gives_full_ap(gt):
    coco_gt, dataset = gt
    evaluator = CocoEvaluator(coco_gt, dataset.label_map)
    evaluator.update(gt_as_predictions(coco_gt, dataset.label_map))
    evaluator.synchronize()  # not distributed: a no-op merge
    metrics = evaluator.summarize()
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(100.0), name  # percent
    assert set(metrics["per_class"]) == {"rectangle", "ellipse", "triangle", "cross", "ring", "diamond"}
    assert all(ap == pytest.approx(100.0) for ap in metrics["per_class"].values())  # percent
    table = evaluator.format_per_class_table()
    assert "diamond" in table and "100.0" in table


def test_category_ids_as_labels_give_full_ap_and_drop_non_categories(gt):
    """label_mapping="category_id" (COCO + official checkpoints): label = category id. Detections whose label is
    no category of the json (a gap between ids, 0, or past the largest id) are dropped, not an error."""
    coco_gt, contiguous = gt
    dataset = CocoDataset(img_folder=contiguous.img_folder, ann_file=contiguous.ann_file, transforms=None,
                          label_mapping="category_id")
    label_map = dataset.label_map
    assert label_map.num_classes == 12 and label_map.category_ids == [1, 3, 5, 7, 9, 11]
    _, target = dataset[0]
    raw = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=int(target["image_id"]), iscrowd=False))
    assert sorted(target["labels"].tolist()) == sorted(a["category_id"] for a in raw)  # the ids themselves

    predictions = gt_as_predictions(coco_gt, label_map)
    for pred in predictions.values():  # confident detections of non-categories on top of the perfect ones
        pred["scores"] = torch.cat([pred["scores"], torch.ones(4)])
        pred["labels"] = torch.cat([pred["labels"], torch.tensor([0, 2, 10, 50])])
        pred["boxes"] = torch.cat([pred["boxes"], torch.tensor([[0.0, 0, 9, 9]] * 4)])
    evaluator = CocoEvaluator(coco_gt, label_map)
    evaluator.update(predictions)
    results = evaluator.to_coco_results()
    assert {r["category_id"] for r in results} <= set(label_map.category_ids)
    assert len(results) == sum(len(coco_gt.getAnnIds(imgIds=i)) for i in coco_gt.getImgIds())
    metrics = evaluator.summarize()
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(100.0), name  # percent


def test_numbers_equal_a_direct_cocoeval_run(gt, tmp_path):
    coco_gt, dataset = gt
    evaluator = CocoEvaluator(coco_gt, dataset.label_map)
    evaluator.update(gt_as_predictions(coco_gt, dataset.label_map, jitter=3.0))
    metrics = evaluator.summarize()
    path = str(tmp_path / "dets.json")
    evaluator.save_detections(path)

    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco_gt, coco_gt.loadRes(path), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    # Percent (engine/metrics.py): COCOeval's fractions x 100, its -1 (no ground truth) kept.
    expected = [100 * v if v >= 0 else v for v in reference.stats]
    assert [metrics[name] for name in METRIC_NAMES] == pytest.approx(expected, abs=1e-10)
    assert metrics["ap_unit"] == "percent"
    assert 10 < metrics["AP"] < 95  # the jitter must make this a non-trivial comparison

    # Per-class AP equals COCOeval restricted to that one category.
    category = coco_gt.loadCats(5)[0]
    with contextlib.redirect_stdout(io.StringIO()):
        single = COCOeval(coco_gt, coco_gt.loadRes(path), iouType="bbox")
        single.params.catIds = [5]
        single.evaluate()
        single.accumulate()
        single.summarize()
    assert metrics["per_class"][category["name"]] == pytest.approx(100 * single.stats[0], abs=1e-10)


def test_zero_detections_give_zero_ap(gt):
    coco_gt, dataset = gt
    evaluator = CocoEvaluator(coco_gt, dataset.label_map)
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update({image_id: empty for image_id in coco_gt.getImgIds()})
    metrics = evaluator.summarize()
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    assert all(ap == 0.0 for ap in metrics["per_class"].values())
    assert CocoEvaluator(coco_gt, dataset.label_map).summarize()["AP"] == 0.0  # nothing updated at all


def test_label_outside_the_label_map_is_an_error(gt):
    coco_gt, dataset = gt
    evaluator = CocoEvaluator(coco_gt, dataset.label_map)
    image_id = coco_gt.getImgIds()[0]
    evaluator.update({image_id: {"scores": torch.ones(1), "labels": torch.tensor([6]),
                                 "boxes": torch.tensor([[0.0, 0, 5, 5]])}})
    with pytest.raises(ValueError, match=f"image id {image_id}.*label 6"):
        evaluator.summarize()


class _ReplayModel(torch.nn.Module):
    """Returns each batch's ground truth as its 'prediction' (in eval mode, without grad), to test the plumbing."""

    def __init__(self, batches):
        super().__init__()
        self.batches = iter(batches)
        self.calls, self.sizes = [], []

    def forward(self, images, mask, image_sizes=None):
        self.calls.append((self.training, torch.is_grad_enabled(), images.shape[0] == mask.shape[0]))
        # The sizes the model is told must be the unpadded extents of the mask it gets.
        self.sizes.append((image_sizes, [(int((~m).any(1).sum()), int((~m).any(0).sum())) for m in mask]))
        return {"targets": next(self.batches)}


def _replay_postprocessor(outputs, target_sizes):
    results = []
    for target, (h, w) in zip(outputs["targets"], target_sizes.tolist()):
        cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        results.append({"scores": torch.ones(len(boxes)), "labels": target["labels"], "boxes": boxes})
    return results


def test_evaluate_runs_the_loop_in_eval_mode(gt):
    coco_gt, dataset = gt
    loader = DataLoader(dataset, batch_size=5, collate_fn=collate_batch)
    model = _ReplayModel([targets for _, _, targets in loader])
    model.train()
    metrics = evaluate(model, _replay_postprocessor, loader, torch.device("cpu"), dataset.label_map, coco_gt,
                       instruments=False)  # a replay model has no tokens to measure
    assert metrics["AP"] == pytest.approx(100.0)
    assert model.calls and all(call == (False, False, True) for call in model.calls)
    assert model.training  # mode restored
    assert all(given == from_mask for given, from_mask in model.sizes)
    assert any(len(set(given)) > 1 for given, _ in model.sizes)  # images of different sizes: padded batches


def _gather_worker(rank, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        evaluator = CocoEvaluator(coco_gt=None, label_map=None)
        # Rank 0 saw images 1, 2; rank 1 saw 2 (padding duplicate) and 3.
        mine = {1: 1.0, 2: 2.0} if rank == 0 else {2: 2.0, 3: 3.0}
        evaluator.update({i: {"scores": torch.tensor([s]), "labels": torch.tensor([0]), "boxes": torch.zeros(1, 4)}
                          for i, s in mine.items()})
        evaluator.synchronize()
        queue.put((rank, {i: float(p["scores"][0]) for i, p in evaluator.predictions.items()}))
    finally:
        dist.destroy_process_group()


def test_synchronize_merges_predictions_across_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # fork: no re-import of torch in the children, keeps the test to ~1 s
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == {1: 1.0, 2: 2.0, 3: 3.0}
