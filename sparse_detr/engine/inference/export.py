"""ONNX export of the whole inference graph, and its check with onnxruntime (what `tools/export_onnx.py` runs).

`DeployModel` is the exported graph: normalisation → backbone → token scoring and top-ρ selection → sparse
encoder → decoder → top-100 postprocess. Input ``images`` (B, 3, H, W) float RGB in [0, 1] (no padding: one size per
batch); outputs ``boxes`` (B, n, 4) xyxy in input pixels, ``scores`` (B, n) sorted decreasingly, ``labels`` (B, n)
int64, n = min(100, Q·K).

    onnx_path = export_onnx(model, "model.onnx", height=512, width=512, dynamic=True)
    report = compare_onnx(onnx_path, DeployModel(model), [torch.rand(1, 3, 512, 512)])

The exporter is `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript); the deformable attention op is
lowered by the translation registered for it (`ops/onnx_translation.py`, ONNX GridSample, opset 18), never by
tracing the Python reference. `dynamic=True` keeps batch, height and width symbolic (one file for every size);
without it the file accepts only the example's shape. Needs the `export` extra (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sparse_detr.data.transforms import imagenet_stats
from sparse_detr.models.postprocess import PostProcess
from sparse_detr.engine.timing import median_seconds
from sparse_detr.ops import backend_for

__all__ = ["DeployModel", "export_onnx", "onnx_session", "run_onnx", "compare_onnx", "time_inference",
           "describe_graph", "within_tolerance",
           "INPUT_NAMES", "OUTPUT_NAMES"]

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


def _require_export_extra() -> None:
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: install the extra with "
                          "`pip install -e .[export] --no-build-isolation -c constraints.txt`")


class DeployModel(nn.Module):
    """The exported inference graph (see the module docstring) around a detector in eval mode."""

    def __init__(self, model: nn.Module, num_select: int = 100) -> None:
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(num_select)
        mean, std = imagenet_stats()
        self.register_buffer("pixel_mean", mean[None], persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("pixel_std", std[None], persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, _, height, width = images.shape
        # An explicit all-False mask: the model then takes no per-image size list (which would fix the batch size
        # in the graph); the kept-token bound k is the same, every image fills the canvas.
        mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        out = self.model((images - self.pixel_mean) / self.pixel_std, mask)
        # torch.full keeps the sizes symbolic under torch.export (torch.tensor would fix them).
        size = torch.stack([torch.full((), height, dtype=torch.int64, device=images.device),
                            torch.full((), width, dtype=torch.int64, device=images.device)])
        scores, labels, boxes = self.postprocess.select(out["pred_logits"], out["pred_boxes"],
                                                        size[None].expand(batch, 2))
        return boxes, scores, labels


def export_onnx(model: nn.Module, path: str, height: int = 512, width: int = 512, batch: int = 1,
                dynamic: bool = False, min_size: int = 128, max_size: int = 4096, num_select: int = 100,
                optimize: bool = True) -> str:
    """Export `model` (a detector; put in eval mode here) with `DeployModel` to `path`; returns `path`.

    Static: the file takes (batch, 3, height, width) only. Dynamic: batch 1..64 and height, width in
    [min_size, max_size] (the traced example uses batch >= 2 and height x width). `min_size` must give the
    coarsest level at least 2 x 2 tokens and the images at least num_queries tokens for the two-stage selection
    (128 does for the shipped configs); torch.export names the bound when it does not. `optimize`: run the
    onnxscript graph optimizer (constant folding, fewer nodes; onnxruntime optimises the graph again at load).
    """
    _require_export_extra()
    from sparse_detr.ops.onnx_translation import OPSET, onnx_translations

    if backend_for("cpu", torch.float32) == "reference":
        raise RuntimeError("ONNX export traces the registered op sparse_detr::ms_deform_attn, but the CPU kernel is "
                           "not built or SPARSE_DETR_OPS=reference is set: build the extension (`pip install -e . "
                           "--no-build-isolation`) and unset SPARSE_DETR_OPS")
    wrapper = DeployModel(model.eval(), num_select).eval()
    example = torch.rand(max(batch, 2) if dynamic else batch, 3, height, width,
                         generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = ({0: dim("batch", min=1, max=64), 2: dim("height", min=min_size, max=max_size),
                           3: dim("width", min=min_size, max=max_size)},)
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=OPSET,
                                    custom_translation_table=onnx_translations(), dynamic_shapes=dynamic_shapes,
                                    input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, optimize=optimize,
                                    verbose=False)
    program.save(path)
    return path


def onnx_session(path: str, threads: int = 0):
    """An onnxruntime CPU session (threads 0 = onnxruntime's default)."""
    _require_export_extra()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, labels) of the ONNX model on images (B, 3, H, W) float in [0, 1]."""
    return tuple(session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.float().numpy()}))


def compare_onnx(path_or_session, wrapper: nn.Module, inputs: Sequence[Tensor], top: int = 10) -> list[dict]:
    """onnxruntime vs PyTorch on each input: max |Δ| of the sorted scores, of the `top` best boxes (pixels), and
    whether the `top` best labels agree. One dict per input (with its shape)."""
    session = onnx_session(path_or_session) if isinstance(path_or_session, str) else path_or_session
    report = []
    for images in inputs:
        with torch.no_grad():
            ref_boxes, ref_scores, ref_labels = (t.numpy() for t in wrapper.eval()(images))
        boxes, scores, labels = run_onnx(session, images)
        report.append({
            "shape": tuple(images.shape),
            "score_diff": float(np.abs(scores.astype(np.float64) - ref_scores).max()),
            "box_diff_px": float(np.abs(boxes[:, :top].astype(np.float64) - ref_boxes[:, :top]).max()),
            "labels_equal": bool((labels[:, :top] == ref_labels[:, :top]).all()),
            "num_detections": int(scores.shape[1]),
        })
    return report


#: Acceptance of an export: sorted scores within 1e-4, top-10 boxes within 1e-2 px, the same top-10 labels.
SCORE_TOLERANCE, BOX_TOLERANCE_PX = 1e-4, 1e-2


def within_tolerance(report: list[dict]) -> bool:
    """Whether every entry of a `compare_onnx` report meets the acceptance tolerances."""
    return all(r["score_diff"] < SCORE_TOLERANCE and r["box_diff_px"] < BOX_TOLERANCE_PX and r["labels_equal"]
               for r in report)


def time_inference(fns: dict, images: Tensor, repeats: int = 10, warmup: int = 2) -> dict:
    """Median wall time in milliseconds of each `fns[name](images)`, timed in turns (``engine.timing``)."""
    seconds = median_seconds({name: (lambda fn=fn: fn(images)) for name, fn in fns.items()}, repeats, warmup)
    return {name: 1000.0 * t for name, t in seconds.items()}


def describe_graph(path: str) -> dict:
    """Op-type counts of an ONNX file (to show that the attention became GridSample and no custom op is left)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    counts: dict = {}
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts
