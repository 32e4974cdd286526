"""Models of sparse-detr: the detector and its parts, the criterion, the postprocessor, and ``build_model``.

``build_model(cfg) -> (model, criterion, postprocessor)`` is the only function here that reads a config; see
``build.py`` for the usage and ``detector.py`` for the output dict of the model.
"""

from sparse_detr.models.build import BACKBONES, build_detector, build_model
from sparse_detr.models.criterion import SetCriterion, build_weight_dict, weighted_total
from sparse_detr.models.detector import MLP, SparseDETR
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.postprocess import PostProcess

__all__ = [
    "BACKBONES", "build_detector", "build_model", "SparseDETR", "MLP", "SetCriterion", "build_weight_dict",
    "weighted_total", "HungarianMatcher", "PostProcess",
]
