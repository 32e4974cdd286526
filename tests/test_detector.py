"""The full detector: forward + backward of every family on two images of different sizes, the output contract,
input forms, and two-stage query selection (Sparse DETR Sec. 3; Deformable DETR Sec. 4)."""
import math

import pytest
import torch
from torch import nn

from sparse_detr.config import load_config
from sparse_detr.models import build_model, weighted_total
from sparse_detr.models.encoder import grid_proposals
from sparse_detr.models.queries import two_stage_queries

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0"]
IMAGES = [(3, 64, 96), (3, 96, 72)]
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _build(config, *extra):
    torch.manual_seed(0)
    return build_model(load_config(f"configs/{config}.yaml", SMALL + list(extra)))


def _check_head(head, batch, num, classes):
    assert head["pred_logits"].shape == (batch, num, classes)
    assert head["pred_boxes"].shape == (batch, num, 4)
    assert torch.isfinite(head["pred_logits"]).all()
    boxes = head["pred_boxes"] if "valid" not in head else head["pred_boxes"][head["valid"]]
    assert ((boxes >= 0) & (boxes <= 1)).all()


# The backbone is trained in two cases only: its backward dominates the CPU time and is the same in every family.
@pytest.mark.parametrize("config, rho, train_backbone", [
    ("deformable_detr_r50", 0.0, False),
    ("deformable_detr_r50_refine", 0.0, False),  # 2-d reference points, then boxes (refinement)
    ("deformable_detr_r50_two_stage", 0.0, False),
    ("efficient_detr_r50", 0.0, False),
    ("sparse_detr_r50_rho0.1", 0.1, True),
    ("sparse_detr_r50_rho0.5", 0.5, False),
    ("sparse_detr_swin_t_rho0.1", 0.1, True),
    ("sparse_detr_r50_rho0.1_os", 0.1, False),
    ("demo_synthetic", 0.1, True),  # the tiny_cnn backbone
])
def test_forward_backward_and_output_contract(config, rho, train_backbone):
    extra = f"model.train_backbone={str(train_backbone).lower()}"
    model, criterion, _ = _build(config, extra)
    m = load_config(f"configs/{config}.yaml", SMALL + [extra]).model
    torch.manual_seed(1)
    images = [torch.randn(*s) for s in IMAGES]
    out = model(images)

    B, Q, K, Ld = 2, 12, 5, 2
    S = out["padding_mask"].shape[1]
    assert out["spatial_shapes"].shape == (4, 2) and out["level_start_index"].shape == (4,)
    assert int(out["spatial_shapes"].prod(1).sum()) == S
    _check_head(out, B, Q, K)
    assert len(out["aux_outputs"]) == Ld - 1
    for aux in out["aux_outputs"]:
        _check_head(aux, B, Q, K)
    assert ("enc_outputs" in out) == m.two_stage
    if m.two_stage:
        _check_head(out["enc_outputs"], B, S, K)
        # the official recipes count every token in the two-stage loss (enc_loss_padding: official)
        assert out["enc_outputs"]["valid"].all() == (m.enc_loss_padding == "official")
        if m.enc_loss_padding == "exclude":
            assert not (out["enc_outputs"]["valid"] & out["padding_mask"]).any()

    if rho == 0:
        for key in ("selection", "enc_aux_outputs"):
            assert key not in out
    else:
        valid_tokens = (~out["padding_mask"]).sum(1)
        expected = [math.floor(int(v) * rho) + 1 for v in valid_tokens]
        assert out["selection"].counts.tolist() == expected
        k = out["selection"].indices.shape[1]
        assert out["selection"].valid.shape == (B, k) and out["selection"].valid.sum(1).tolist() == expected
        assert not out["padding_mask"].gather(1, out["selection"].indices)[out["selection"].valid].any()
        assert len(out["enc_aux_outputs"]) == m.enc_layers - 1
        for aux in out["enc_aux_outputs"]:
            _check_head(aux, B, k, K)
            # official: every slot up to the batch's largest k_b; exclude: the first k_b of each image
            slots = torch.arange(k)[None, :] < (max(expected) if m.enc_loss_padding == "official"
                                                 else torch.tensor(expected)[:, None])
            assert torch.equal(aux["valid"], slots.expand(B, k))
        assert len(out["selection"].layer_indices) == m.enc_layers
        if m.scorer_target == "dam":
            assert out["dec_sampling_locations"].shape[:3] == (B, Ld, Q)
            assert model.selector.target(out, TARGETS).sum(1).tolist() == expected
            assert "backbone" not in out["selection"].heads
        else:
            _check_head(out["selection"].heads["backbone"], B, S, K)
            assert "dec_sampling_locations" not in out

    losses = criterion(out, TARGETS)
    loss = weighted_total(losses, criterion.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    backbone = [g for n, g in grads.items() if n.startswith("tokens.backbone.")]
    assert bool(backbone) == train_backbone
    assert all(g is not None and g.abs().sum() > 0 for g in backbone[-10:])  # the loss reaches the backbone
    assert grads["encoder.stack.layers.0.self_attn.value_proj.weight"].abs().sum() > 0
    assert grads["tokens.input_proj.3.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_fewer_feature_levels(levels):
    """L < 4: the last min(L, 3) backbone levels (C5 only for L = 1), no extra stride-2 level."""
    model, _, _ = _build("sparse_detr_r50_rho0.1", f"model.num_feature_levels={levels}", "model.num_queries=4")
    assert [p[0].in_channels for p in model.tokens.input_proj] == [512, 1024, 2048][-levels:]
    with torch.no_grad():
        out = model([torch.randn(3, 128, 96)])
    assert out["spatial_shapes"].tolist() == [[128 // s, 96 // s] for s in (8, 16, 32)][-levels:]
    assert out["pred_boxes"].shape == (1, 4, 4) and out["selection"].counts.shape == (1,)


def test_inference_outputs_and_input_forms():
    """A list of images, and the same images as a padded batch + mask (with or without their sizes), give the same
    detections; in eval mode there is no DAM unless asked for."""
    model, _, _ = _build("sparse_detr_r50_rho0.3")
    model.eval()
    torch.manual_seed(2)
    images = [torch.randn(*s) for s in IMAGES]
    batch = torch.zeros(2, 3, 96, 96)
    mask = torch.ones(2, 96, 96, dtype=torch.bool)
    for b, im in enumerate(images):
        batch[b, :, :im.shape[1], :im.shape[2]] = im
        mask[b, :im.shape[1], :im.shape[2]] = False
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(batch, mask)  # image sizes unknown: k from the padded shape
        from_sized = model(batch, mask, image_sizes=[(64, 96), (96, 72)])
        maps = model(images, return_maps=True)
    assert "dec_sampling_locations" not in from_list and from_list["selection"].scores.shape[0] == 2
    assert from_batch["selection"].indices.shape[1] >= from_sized["selection"].indices.shape[1]
    for other in (from_batch, from_sized):
        torch.testing.assert_close(other["pred_logits"], from_list["pred_logits"])
        torch.testing.assert_close(other["pred_boxes"], from_list["pred_boxes"])
        assert torch.equal(other["selection"].counts, from_list["selection"].counts)
    assert model.selector.target(maps, None).shape == from_list["padding_mask"].shape


def test_refinement_from_points_predicts_full_boxes_then_refines_them():
    """Plain queries + refinement (Deformable DETR App. A.4): layer 0 attends around 2-d points and its head's full
    (cx, cy, w, h) output is added to (inverse_sigmoid(point), 0, 0); from layer 1 on, the reference is the previous
    layer's box, detached, and the head's output is added to all four of its inverse-sigmoid coordinates."""
    from sparse_detr.box_ops import inverse_sigmoid
    from sparse_detr.models.decoder import Decoder

    torch.manual_seed(0)
    dim, shapes = 32, [(6, 8), (3, 4)]
    decoder = Decoder(3, refine=True, d_model=dim, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4, n_points=2)
    heads = [nn.Linear(dim, 4) for _ in range(3)]
    spatial = torch.tensor(shapes)
    start = torch.tensor([0, 48])
    points = torch.rand(2, 5, 2) * 0.6 + 0.2
    dec = decoder(torch.randn(2, 5, dim), torch.randn(2, 5, dim), points, torch.randn(2, 60, dim), spatial, start,
                  torch.ones(2, 2, 2), torch.zeros(2, 60, dtype=torch.bool), heads)
    assert [r.shape[-1] for r in dec.references] == [2, 4, 4]
    first = (heads[0](dec.hidden[0]) + torch.cat((inverse_sigmoid(points), torch.zeros_like(points)), -1)).sigmoid()
    torch.testing.assert_close(dec.boxes[0], first)
    for layer in (1, 2):
        assert torch.equal(dec.references[layer], dec.boxes[layer - 1].detach())
        expected = (heads[layer](dec.hidden[layer]) + inverse_sigmoid(dec.boxes[layer - 1])).sigmoid()
        torch.testing.assert_close(dec.boxes[layer], expected)
    # Detached between layers: the last boxes do not train the first layer's head.
    grad = torch.autograd.grad(dec.boxes[2].sum(), heads[0].weight, allow_unused=True)[0]
    assert grad is None or not grad.any()


@pytest.mark.parametrize("query_padding", ["official", "exclude"])
def test_two_stage_selection_over_padding(query_padding):
    """Padded / invalid-proposal tokens scored above every valid one: ``official`` takes the top-Q of a direct sort
    over all tokens (padding included, reference box 1), ``exclude`` the top-Q of the valid tokens only."""
    shapes = [(6, 8), (3, 4)]
    pad = torch.zeros(2, 60, dtype=torch.bool)
    pad[1, :48] = torch.ones(6, 8, dtype=torch.bool).index_fill_(1, torch.arange(4), False).flatten()
    pad[1, 48:] = torch.ones(3, 4, dtype=torch.bool).index_fill_(1, torch.arange(2), False).flatten()
    proposals, valid = grid_proposals(pad, shapes)
    torch.manual_seed(0)
    valid &= torch.rand(2, 60) > 0.3  # stand-ins for tokens whose box leaves (0.01, 0.99) (large images)
    proposals = proposals.masked_fill(~valid[..., None], float("inf"))
    objectness = torch.rand(2, 60) + 100.0 * ~valid  # distinct values, every invalid token above every valid one

    class Fixed(nn.Module):  # a "class head" returning the objectness above
        def forward(self, x):
            return objectness[..., None].expand(*x.shape[:2], 3) + x[..., :1] * 0

    dim = 16
    memory = torch.arange(60.0)[None, :, None].expand(2, 60, dim).contiguous()  # channel 0 = token index
    proj, norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
    box_head = nn.Linear(dim, 4)
    tgt, query_pos, reference, enc = two_stage_queries(
        memory, proposals, valid, proj, norm, Fixed(), box_head, nn.Linear(2 * dim, dim), nn.LayerNorm(dim),
        num_queries=10, specific_head=True, eff_query_init=True, query_padding=query_padding)
    chosen = tgt[..., 0].long()  # eff_query_init: content = memory at the chosen tokens
    ranked = objectness if query_padding == "official" else objectness.masked_fill(~valid, -1.0)
    for b in range(2):  # a direct sort of every token
        expected = sorted(range(60), key=lambda i: -float(ranked[b, i]))[:10]
        assert sorted(chosen[b].tolist()) == sorted(expected)
    picked_invalid = ~valid.gather(1, chosen)
    assert picked_invalid.any() == (query_padding == "official")
    assert (reference[picked_invalid] == 1).all() and (reference[~picked_invalid] < 1).all()
    assert tgt.shape == query_pos.shape == (2, 10, dim)


def test_encoder_aux_heads_are_training_only():
    """The encoder aux heads only feed losses: inference skips them, and their absence changes no prediction."""
    model, _, _ = _build("sparse_detr_r50_rho0.1", "model.train_backbone=false")
    images = [torch.randn(*s, generator=torch.Generator().manual_seed(3)) for s in IMAGES]
    calls = []
    hook = model.encoder.aux_class_embed[-1].register_forward_hook(lambda *a: calls.append(1))  # the last encoder aux head
    model.train()
    with torch.no_grad():
        train_out = model(images)
    assert calls and len(train_out["enc_aux_outputs"]) == 1
    calls.clear()
    model.eval()
    with torch.no_grad():
        eval_out = model(images)
    hook.remove()
    assert not calls and "enc_aux_outputs" not in eval_out
    # dropout is 0, so train and eval modes compute the same detections
    torch.testing.assert_close(eval_out["pred_boxes"], train_out["pred_boxes"])
    torch.testing.assert_close(eval_out["pred_logits"], train_out["pred_logits"])


def test_parts_recombine_a_sparse_detector_keeping_every_token_is_the_dense_one():
    """The builder composes, the detector runs its parts: the same token stage, encoder layers, queries and decoder
    recombined around a dense encoder stage (no selector) give the sparse detector's predictions when its selector
    keeps every token (ρ = 1, one unpadded image: every token is updated either way)."""
    from sparse_detr.models.detector import SparseDETR
    from sparse_detr.models.encoder import EncoderStage

    sparse, _, _ = _build("sparse_detr_r50_rho0.1", "model.rho=1.0", "model.train_backbone=false")
    dense = SparseDETR(sparse.tokens, EncoderStage(sparse.encoder.stack, None, sparse.encoder.proposal_proj),
                       sparse.queries, sparse.decoder).eval()
    sparse.eval()
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = sparse(image), dense(image)
    assert bool(a["selection"].valid.all()) and a["selection"].indices.shape[1] == a["padding_mask"].shape[1]
    assert "selection" not in b
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=1e-4, rtol=1e-4)
    # The same tensors under the same official names, whichever detector holds the parts (the dense one lacks only
    # the scorer and the encoder aux heads).
    full, part = sparse.state_dict(keep_vars=True), dense.state_dict(keep_vars=True)
    assert all(full[k] is v for k, v in part.items())
    assert {k.split(".")[1] for k in set(full) - set(part) if k.startswith("transformer.")} == {
        "enc_mask_predictor", "encoder", "decoder"}  # the scorer; the aux heads' encoder / decoder aliases
