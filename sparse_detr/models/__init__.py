"""The detector and its parts, the criterion, the postprocessor; ``build_model`` (build.py) reads the config."""

from sparse_detr.models.build import BACKBONES, build_detector, build_model
from sparse_detr.models.criterion import SetCriterion, build_weight_dict, weighted_total
from sparse_detr.models.detector import MLP, SparseDETR
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.postprocess import PostProcess

__all__ = [
    "BACKBONES", "build_detector", "build_model", "SparseDETR", "MLP", "SetCriterion", "build_weight_dict",
    "weighted_total", "HungarianMatcher", "PostProcess",
]
