"""CNN / Swin backbones that turn padded images into multi-scale feature maps (Deformable DETR Sec. 4.1: C3-C5).

The backbone network is torchvision's, kept under torchvision's own parameter names so that
torchvision / official checkpoints load without renaming: inside the detector the keys read
``backbone.0.body.conv1.weight`` ... ``backbone.0.body.layer4.2.bn3.running_var`` (265 tensors for
ResNet-50, the official layout). Swin-T (swin.py) is built from torchvision's Swin blocks, under their names
plus the output norms; official Swin-T checkpoints are renamed by ``swin.official_to_ours``.
``backbone.1`` is the parameter-free sine position encoding.

Every BatchNorm is a :class:`FrozenBatchNorm2d`: detection batches are 2 images per GPU, far too few
for batch statistics, so the ImageNet statistics are kept fixed.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from sparse_detr.errors import UserError

from .position_encoding import PositionEmbeddingSine
from .swin import STAGE_CHANNELS, SwinT, has_official_swin_keys, official_to_ours

__all__ = ["FrozenBatchNorm2d", "Backbone", "Joiner", "build_backbone"]



class PretrainedWeightsError(UserError, RuntimeError):
    """`model.pretrained_backbone` is unreadable."""


def load_weights_file(path: str) -> object:
    """`torch.load(weights_only=True)` of a backbone weights file; any failure names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: {path} (model.pretrained_backbone)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/unpickler errors come in many types; all mean "unreadable"
        raise PretrainedWeightsError(f"cannot read backbone weights {path} (model.pretrained_backbone; truncated, "
                                     f"corrupt or not loadable with weights_only=True): {type(e).__name__}: {e}") from e

class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Holds exactly ``weight``, ``bias``, ``running_mean``, ``running_var`` (C,) — no
    ``num_batches_tracked``; a state dict that has it (any torchvision BatchNorm checkpoint) loads
    and the counter is ignored. forward: (B, C, H, W) → (B, C, H, W), equal to an eval-mode BatchNorm2d.
    """

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The counter only matters for momentum-free running averages, which we never update;
        # dropping it here keeps strict loading of torchvision checkpoints working.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # Fold the four vectors into one scale and shift: one multiply-add per element instead of the
        # four ops of the textbook formula, and no rsqrt over the whole feature map.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _LayerRunner(nn.Module):
    """Runs a fixed sequence of a torchvision model's submodules and keeps named outputs.

    Only the modules in ``keep`` are registered (under their torchvision names), so unused heads
    (ResNet ``fc``, Swin ``norm``/``head``) have no parameters here — DDP then needs no
    ``find_unused_parameters``. A small own version of torchvision's private IntermediateLayerGetter.
    """

    def __init__(self, model: nn.Module, keep: list[str], steps: list[str], returns: list[str], nhwc: bool):
        super().__init__()
        for name in keep:
            self.add_module(name, getattr(model, name))
        self.steps = steps  # dotted submodule names, executed in order
        self.returns = returns  # subset of steps whose outputs are returned
        self.nhwc = nhwc  # torchvision's Swin works channels-last

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for step in self.steps:
            x = self.get_submodule(step)(x)
            if step in self.returns:
                out.append(x.permute(0, 3, 1, 2) if self.nhwc else x)
            if len(out) == len(self.returns):
                break  # later modules (e.g. Swin stage 4 when only C5 is wanted) would be wasted work
        return out


def _resnet50(drop_path_rate: float, interm: bool) -> tuple[nn.Module, list[str], list[int], list[int]]:
    del drop_path_rate  # ResNet has no stochastic depth
    model = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    keep = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    returns = ["layer2", "layer3", "layer4"] if interm else ["layer4"]
    body = _LayerRunner(model, keep, keep, returns, nhwc=False)
    # Not trained (Deformable DETR): the stem and the first stage hold generic low-level filters.
    frozen = ["conv1.", "bn1.", "layer1."]
    channels = [512, 1024, 2048] if interm else [2048]
    return body, frozen, channels, [8, 16, 32] if interm else [32]


def _swin_t(drop_path_rate: float, interm: bool) -> tuple[nn.Module, list[str], list[int], list[int]]:
    """The official detection Swin-T (swin.py): stem padding, shift in every odd block, output norms."""
    stages = (1, 2, 3) if interm else (3,)
    body = SwinT(drop_path_rate, out_stages=stages)
    # Official frozen_stages = 2: the patch embedding and stage 0 with its 96→192 merging (features.0-2) are not
    # trained, and run as in eval mode: no stochastic depth there.
    frozen = ["features.0.", "features.1.", "features.2."]
    for m in body.features[1].modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    return body, frozen, [STAGE_CHANNELS[s] for s in stages], [2 ** (s + 2) for s in stages]


def _swin_t_torchvision(drop_path_rate: float, interm: bool) -> tuple[nn.Module, list[str], list[int], list[int]]:
    """torchvision's swin_t as it is (checkpoint format 1's ``swin_t``): no stem padding, no shift on maps that
    fit in one window, no output norms."""
    model = torchvision.models.swin_t(weights=None)
    # swin_t() hard-codes its drop-path maximum (0.2, rising linearly over the blocks) and rejects
    # the keyword; rescale every block's rate so the ladder's maximum is drop_path_rate instead.
    drop_paths = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    top = max(m.p for m in drop_paths)
    for m in drop_paths:
        m.p = m.p * drop_path_rate / top
    # torchvision's features: 0 patch embedding, 1 stage 1, 2 merge, 3 stage 2, 4 merge, 5 stage 3,
    # 6 merge, 7 stage 4. Stages 2..4 give 192/384/768 channels at strides 8/16/32.
    steps = [f"features.{i}" for i in range(len(model.features))]
    returns = ["features.3", "features.5", "features.7"] if interm else ["features.7"]
    body = _LayerRunner(model, ["features"], steps, returns, nhwc=True)
    # Patch embedding and stage-1 blocks frozen; the 96→192 patch merging (features.2) is trained.
    frozen = ["features.0.", "features.1."]
    return body, frozen, [192, 384, 768] if interm else [768], [8, 16, 32] if interm else [32]


def _swin_pretrained(state: dict) -> dict:
    """ImageNet Swin-T weights in torchvision's layout or the official Swin repository's (``layers.*``)."""
    state = official_to_ours(state) if has_official_swin_keys(state) else state
    return {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}  # the classifier


# name → (constructor, ImageNet state dict → body state dict, body keys an ImageNet checkpoint does not have)
_NETWORKS = {
    "resnet50": (_resnet50, lambda s: {k: v for k, v in s.items() if not k.startswith("fc.")}, ()),
    # The detection output norms are new: the official training starts them at (1, 0) too.
    "swin_t": (_swin_t, _swin_pretrained, ("norm1.", "norm2.", "norm3.")),
    "swin_t_torchvision": (_swin_t_torchvision, _swin_pretrained, ()),
}


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool padding mask -> (B, *size) by nearest resize: a cell is padding iff the pixel it samples is."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Backbone(nn.Module):
    """A torchvision network that returns padded feature maps with their padding masks.

    Args:
        name: ``"resnet50"``, ``"swin_t"`` (the official detection Swin-T, swin.py) or ``"swin_t_torchvision"``
            (torchvision's swin_t unchanged, what ``swin_t`` was in checkpoint format 1).
        train_backbone: train the non-frozen stages (ResNet layer2-4, Swin stages 1-3 and their merges).
        return_interm_layers: return the three strides 8/16/32 (C3, C4, C5); else only C5.
        pretrained: path of a local ImageNet state dict of the network (or a dict holding it under
            ``model``/``state_dict``): torchvision's layout, or for Swin-T also the official Swin repository's
            (``layers.*``). The classifier is dropped; the rest must match exactly (Swin-T's detection output
            norms, which no classifier has, keep their initial values).
        drop_path_rate: Swin stochastic depth (ignored by ResNet).

    Attributes:
        num_channels: channels of each returned level, e.g. [512, 1024, 2048].
        strides: stride of each returned level, e.g. [8, 16, 32].
    """

    def __init__(
        self,
        name: str = "resnet50",
        train_backbone: bool = True,
        return_interm_layers: bool = True,
        pretrained: str | os.PathLike | None = None,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if name not in _NETWORKS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_NETWORKS)}")
        build, self._adapt_pretrained, self._new_keys = _NETWORKS[name]
        self.name = name
        self.body, frozen, channels, strides = build(drop_path_rate, return_interm_layers)
        self.num_channels: list[int] = channels
        self.strides: list[int] = strides
        if pretrained is not None:
            self.load_pretrained(pretrained)
        for pname, p in self.body.named_parameters():
            if not train_backbone or pname.startswith(tuple(frozen)):
                p.requires_grad_(False)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load an ImageNet checkpoint of the network into ``body`` (strict but for the detection-only keys)."""
        path = os.fspath(path)
        state = load_weights_file(path)
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict")
        state = self._adapt_pretrained(state)
        own = self.body.state_dict()
        state.update({k: own[k] for k in own if k.startswith(self._new_keys) and k not in state})
        try:
            self.body.load_state_dict(state, strict=True)
        except RuntimeError as err:  # names the missing/unexpected/mis-shaped keys; add which file it was
            raise RuntimeError(f"backbone weights in {path} do not fit {self.name}: {err}") from err

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Args: images (B, 3, H, W); mask (B, H, W) bool, True = padding.

        Returns: one (feature (B, C_l, H_l, W_l), mask (B, H_l, W_l) bool) per level, finest first.
        """
        out = []
        for feature in self.body(images):
            out.append((feature, resize_mask(mask, feature.shape[-2:])))
        return out


class Joiner(nn.Sequential):
    """Backbone + position encoding; an nn.Sequential so their keys are ``0.body.*`` and ``1``.

    forward(images (B, 3, H, W), mask (B, H, W) bool) returns three lists over levels:
    features (B, C_l, H_l, W_l), masks (B, H_l, W_l) bool, pos (B, d, H_l, W_l) in the features' dtype.
    """

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels: list[int] = backbone.num_channels
        self.strides: list[int] = backbone.strides

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        features, masks, pos = [], [], []
        for feature, level_mask in self[0](images, mask):
            features.append(feature)
            masks.append(level_mask)
            pos.append(self[1](level_mask).to(feature.dtype))
        return features, masks, pos


def build_backbone(
    name: str,
    hidden_dim: int,
    train_backbone: bool,
    num_feature_levels: int,
    pretrained: str | os.PathLike | None = None,
    drop_path_rate: float = 0.2,
) -> Joiner:
    """Backbone + sine encoding with hidden_dim // 2 features per axis (so pos has hidden_dim channels).

    One feature level means C5 only; more means C3..C5 (extra levels are made by the detector's input
    projections, not here).
    """
    backbone = Backbone(
        name,
        train_backbone=train_backbone,
        return_interm_layers=num_feature_levels > 1,
        pretrained=pretrained,
        drop_path_rate=drop_path_rate,
    )
    return Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
