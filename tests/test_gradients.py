"""Every trainable parameter receives a gradient from one training step, for every shipped config family, and the
model says so truthfully (``has_unused_parameters``): DDP without ``find_unused_parameters`` depends on it.

A single-process gloo group then shows the consequence: DDP on the fast path fails at the second step when a head
is unused (box refinement with ``aux_loss: false``), and ``builders.wrap_distributed`` turns the slow path on for
exactly that model.
"""
import pytest
import torch
import torch.distributed as torch_dist

from sparse_detr.config import load_config
from sparse_detr.engine.training import builders
from sparse_detr.models import build_model, weighted_total

# The families differ in the transformer and its heads; the tiny GroupNorm CNN keeps the backbone cheap but still
# trained, so its parameters are checked too.
SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=3",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0",
         "model.backbone=tiny_cnn", "model.train_backbone=true"]
IMAGES = [(3, 64, 96), (3, 96, 72)]  # two sizes: padding, so the `valid` masks matter
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _build(config, extra=()):
    torch.manual_seed(0)
    return build_model(load_config(f"configs/{config}.yaml", SMALL + list(extra)))


def _step(model, criterion, call=None):
    """One forward + weighted loss + backward; returns the trainable parameters without a gradient."""
    torch.manual_seed(1)
    images = [torch.randn(*s) for s in IMAGES]
    out = (call or model)(images)
    losses = criterion(out, TARGETS)
    weighted_total(losses, criterion.weight_dict).backward()
    return [p for p in model.parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("config", [
    "deformable_detr_r50",            # plain: learned queries, shared heads
    "deformable_detr_r50_refine",     # plain + iterative box refinement (per-layer heads)
    "deformable_detr_r50_two_stage",  # two-stage, class-agnostic encoder head
    "efficient_detr_r50",             # two-stage, class-specific head, Sparse DETR query init
    "sparse_detr_r50_rho0.1",         # scorer trained on the DAM, encoder aux heads
    "sparse_detr_r50_rho0.1_os",      # objectness-score selection head (backbone_outputs)
])
def test_every_trainable_parameter_gets_a_gradient(config):
    model, criterion, _ = _build(config)
    assert _step(model, criterion) == []
    assert not model.has_unused_parameters()


def test_os_head_is_trained_by_its_own_loss():
    model, criterion, _ = _build("sparse_detr_r50_rho0.1_os")
    torch.manual_seed(1)
    out = model([torch.randn(*s) for s in IMAGES])
    losses = criterion(out, TARGETS)
    assert {"loss_ce_backbone", "loss_bbox_backbone", "loss_giou_backbone"} <= set(losses) & set(
        criterion.weight_dict)
    # Only the `_backbone` terms reach the OS head: its gradient comes from them alone.
    backbone_only = sum(losses[k] * criterion.weight_dict[k] for k in losses if k.endswith("_backbone"))
    backbone_only.backward()
    head = model.selector.backbone_class_embed.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.parametrize("config, extra, unused", [
    ("deformable_detr_r50", ["model.aux_loss=false"], False),  # shared heads: the last layer trains them
    ("deformable_detr_r50_refine", ["model.aux_loss=false"], True),
    ("sparse_detr_r50_rho0.1", ["model.aux_loss=false"], True),
])
def test_has_unused_parameters_tells_the_truth(config, extra, unused):
    model, criterion, _ = _build(config, extra)
    missing = {id(p) for p in _step(model, criterion)}
    assert model.has_unused_parameters() == unused == bool(missing)
    if unused:  # only heads of decoder layers 0..Ld-2 (their refined boxes are detached), the class heads at least
        class_heads = {id(p) for i in range(2) for p in model.decoder.class_embed[i].parameters()}
        box_heads = {id(p) for i in range(2) for p in model.decoder.bbox_embed[i].parameters()}
        assert class_heads <= missing <= class_heads | box_heads


@pytest.fixture
def process_group(tmp_path):
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def test_ddp_needs_find_unused_exactly_when_the_model_says_so(process_group):
    cpu = torch.device("cpu")
    fast_model, criterion, _ = _build("sparse_detr_r50_rho0.1")
    fast = builders.wrap_distributed(fast_model, cpu, distributed=True)
    assert isinstance(fast, torch.nn.parallel.DistributedDataParallel) and not fast.find_unused_parameters
    assert builders.wrap_distributed(fast_model, cpu, distributed=False) is fast_model

    model, criterion, _ = _build("deformable_detr_r50_refine", ["model.aux_loss=false"])
    plain = torch.nn.parallel.DistributedDataParallel(model)  # the fast path, forced
    _step(model, criterion, plain)
    with pytest.raises(RuntimeError, match="(?i)unused|finished reduction"):
        _step(model, criterion, plain)

    model, criterion, _ = _build("deformable_detr_r50_refine", ["model.aux_loss=false"])
    net = builders.wrap_distributed(model, cpu, distributed=True)
    assert net.find_unused_parameters
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        _step(model, criterion, net)
