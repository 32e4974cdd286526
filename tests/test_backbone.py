"""CPU tests for the backbone (key layout, frozen parts, checkpoint loading, shapes, masks) and the
sine position encodings (checked against the formulas written out by hand)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from sparse_detr.models.backbone import Backbone, FrozenBatchNorm2d, Joiner, build_backbone
from sparse_detr.models.position_encoding import PositionEmbeddingSine, sine_embed_boxes


@pytest.fixture(scope="module")
def resnet() -> Backbone:
    torch.manual_seed(0)
    return Backbone("resnet50", train_backbone=True, return_interm_layers=True).eval()


def _torchvision_resnet50_keys() -> list[str]:
    sd = torchvision.models.resnet50(weights=None).state_dict()
    return [k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]


def test_resnet50_state_dict_keys_match_torchvision(resnet):
    keys = list(resnet.state_dict())
    expected = ["body." + k for k in _torchvision_resnet50_keys()]
    assert keys == expected
    assert len(keys) == 265  # the official `backbone.0.body.*` count
    assert "body.layer4.2.bn3.running_var" in keys
    # Inside a Joiner the keys gain the official `0.` prefix; the position encoding adds none.
    joiner_keys = list(build_backbone("resnet50", 256, True, 4).state_dict())
    assert joiner_keys == ["0." + k for k in expected]


def test_every_batchnorm_is_frozen_and_stem_not_trained(resnet):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    for name, p in resnet.body.named_parameters():
        assert p.requires_grad == (not name.startswith(("conv1.", "bn1.", "layer1."))), name
    frozen_all = Backbone("resnet50", train_backbone=False, return_interm_layers=False)
    assert not any(p.requires_grad for p in frozen_all.parameters())


def test_frozen_batchnorm_equals_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # has num_batches_tracked: accepted and ignored
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


def test_pretrained_torchvision_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # make the BN statistics non-trivial so a skipped buffer would show
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet50.pth"
    torch.save({"model": reference.state_dict()}, path)  # wrapped form, with fc.* and counters
    model = Backbone("resnet50", pretrained=str(path))
    ref_sd = reference.state_dict()
    for key, value in model.body.state_dict().items():
        torch.testing.assert_close(value, ref_sd[key], rtol=0, atol=0, msg=key)


def test_pretrained_mismatch_and_missing_file_name_the_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(RuntimeError, match="resnet18.pth") as info:
        Backbone("resnet50", pretrained=path)
    assert "layer1.0.conv3.weight" in str(info.value)  # torch's list of missing keys is kept
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Backbone("resnet50", pretrained=missing)


def test_unreadable_pretrained_file_is_named(tmp_path):
    from sparse_detr.models.tiny_backbone import TinyBackbone

    broken = tmp_path / "half_downloaded.pth"
    broken.write_bytes(b"PK\x03\x04 not a whole zip")
    for build in (lambda: Backbone("resnet50", pretrained=broken), lambda: TinyBackbone(pretrained=broken)):
        with pytest.raises(RuntimeError, match="half_downloaded.pth.*model.pretrained_backbone"):
            build()


@pytest.mark.parametrize(
    "name, channels", [("resnet50", [512, 1024, 2048]), ("swin_t", [192, 384, 768])]
)
def test_levels_shapes_and_masks_follow_padding(name, channels):
    torch.manual_seed(0)
    joiner = build_backbone(name, hidden_dim=256, train_backbone=True, num_feature_levels=4).eval()
    assert joiner.num_channels == channels and joiner.strides == [8, 16, 32]
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # image 1 is 64×64, padded on the right by 32 px
    mask[1, 48:, :] = True  # ... and at the bottom by 16 px
    with torch.no_grad():
        features, masks, pos = joiner(images, mask)
    for feat, m, p, c, s in zip(features, masks, pos, channels, joiner.strides):
        h, w = 64 // s, 96 // s
        assert feat.shape == (2, c, h, w)
        assert m.shape == (2, h, w) and m.dtype == torch.bool
        assert p.shape == (2, 256, h, w) and p.dtype == feat.dtype
        assert not m[0].any()
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[:, math.ceil(64 / s):] = True
        expected[math.ceil(48 / s):, :] = True
        assert torch.equal(m[1], expected)


@pytest.mark.parametrize("name, frozen", [
    ("swin_t", ("features.0.", "features.1.", "features.2.")),  # official frozen_stages=2: stage 0 + its merging
    ("swin_t_torchvision", ("features.0.", "features.1.")),  # what swin_t froze in checkpoint format 1
])
def test_swin_frozen_parts_and_checkpoint(tmp_path, name, frozen):
    net = torchvision.models.swin_t(weights=None)
    path = tmp_path / "swin_t.pth"
    torch.save(net.state_dict(), path)  # includes the classifier's norm.* and head.*
    model = Backbone(name, return_interm_layers=False, pretrained=path, drop_path_rate=0.1)
    rates = [m.p for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1) and len(rates) == 12  # 2+2+6+2 blocks
    assert rates[2] == pytest.approx(0.1 * 2 / 11)  # linear over the 12 blocks
    assert model.num_channels == [768] and model.strides == [32]
    torch.testing.assert_close(model.body.features[3][0].mlp[0].weight, net.features[3][0].mlp[0].weight)
    for pname, p in model.body.named_parameters():
        assert p.requires_grad == (not pname.startswith(frozen)), pname


def test_joiner_keeps_feature_dtype():
    joiner = Joiner(Backbone("resnet50", return_interm_layers=False), PositionEmbeddingSine(8)).double()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    features, _, pos = joiner(images, torch.zeros(1, 32, 32, dtype=torch.bool))
    assert features[0].dtype == pos[0].dtype == torch.float64


def _sine_reference(coord: float, k: int, num_feats: int, temperature: float = 10000.0) -> float:
    """Feature k of one coordinate, written straight from the formula."""
    angle = coord / temperature ** (2 * (k // 2) / num_feats)
    return math.sin(angle) if k % 2 == 0 else math.cos(angle)


def test_position_embedding_matches_formula():
    num_feats, h, w = 16, 4, 5
    pos = PositionEmbeddingSine(num_feats)(torch.zeros(1, h, w, dtype=torch.bool))
    assert pos.shape == (1, 2 * num_feats, h, w)
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        y = (i + 1 - 0.5) / h * 2 * math.pi  # cell centre, normalised by the valid height
        x = (j + 1 - 0.5) / w * 2 * math.pi
        for k in range(num_feats):
            assert pos[0, k, i, j].item() == pytest.approx(_sine_reference(y, k, num_feats), abs=1e-5)
            expected_x = _sine_reference(x, k, num_feats)
            assert pos[0, num_feats + k, i, j].item() == pytest.approx(expected_x, abs=1e-5)


def test_position_embedding_normalises_by_valid_size():
    embed = PositionEmbeddingSine(8)
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[:, 4:, :] = True
    mask[:, :, 3:] = True  # valid region is the top-left 4×3
    padded = embed(mask)
    unpadded = embed(torch.zeros(1, 4, 3, dtype=torch.bool))
    # The valid region is encoded as if the image were 4×3 ...
    torch.testing.assert_close(padded[..., :4, :3], unpadded)
    # ... which differs from the encoding of the same cells in an unpadded 6×7 image.
    assert not torch.allclose(embed(torch.zeros(1, 6, 7, dtype=torch.bool))[..., :4, :3], unpadded)


def test_sine_embed_boxes():
    boxes = torch.rand(2, 3, 4)
    out = sine_embed_boxes(boxes, num_pos_feats=8)
    assert out.shape == (2, 3, 32)
    box = torch.tensor([0.5, 0.25, 0.1, 0.8])
    emb = sine_embed_boxes(box, num_pos_feats=8)
    # Block c of 8 features encodes coordinate c (cx, cy, w, h order); check a few by hand.
    for c, k in [(0, 0), (1, 1), (2, 4), (3, 7)]:
        expected = _sine_reference(box[c].item() * 2 * math.pi, k, 8)
        assert emb[8 * c + k].item() == pytest.approx(expected, abs=1e-6)
    assert emb[0].item() == pytest.approx(math.sin(math.pi), abs=1e-6)  # cx=0.5: sin(0.5·2π / 1)
    assert emb[9].item() == pytest.approx(math.cos(0.5 * math.pi), abs=1e-6)  # cy=0.25: cos(0.25·2π / 1)
    assert sine_embed_boxes(boxes.to(torch.bfloat16)).dtype == torch.bfloat16
