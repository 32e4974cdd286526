"""Aspect-ratio grouped batching (`data.group_by_aspect_ratio`): batches from one ratio bin, every epoch the same
number of batches as drop_last, exact resume by whole batches, and less padding in a real training run."""
import numpy as np
import pytest

from sparse_detr.config import config_from_dict
from sparse_detr.data import build_dataset
from sparse_detr.engine.training import train as train_mod
from sparse_detr.data.samplers import EpochSampler, GroupedBatchSampler, aspect_ratio_groups


def test_groups_are_the_log2_bins_of_width_over_height():
    # factor 3: edges at 2**(-2/3), 2**(-1/3), 1, 2**(1/3), 2**(2/3) -> bins 0..5
    ratios = [0.3, 0.6, 0.7, 0.99, 1.0, 1.2, 1.3, 1.5, 1.7, 5.0]
    sizes = np.array([(100, 100 * r) for r in ratios])
    assert aspect_ratio_groups(sizes) == [0, 0, 1, 2, 3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("batch", [2, 3])
def test_grouped_batches_cover_an_epoch_like_drop_last(batch):
    rng = np.random.default_rng(0)
    n = 23
    groups = rng.integers(0, 4, size=n).tolist()
    inner = EpochSampler(list(range(n)), num_replicas=1, rank=0, seed=5)
    sampler = GroupedBatchSampler(inner, groups, batch)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == n // batch
    flat = [key for b in batches for key in b]
    assert len(set(flat)) == len(flat) and all(e == 3 for e, _ in flat)
    assert all(len(b) == batch for b in batches)
    mixed = [b for b in batches if len({groups[i] for _, i in b}) > 1]
    # Only the end-of-epoch leftovers mix groups: fewer than batch-1 samples per group are left over.
    assert len(mixed) <= 4 * (batch - 1) // batch + 1
    order = [i for _, i in inner]  # the epoch's shuffled order
    pure = [b for b in batches if b not in mixed]
    for b in pure:  # a group's batch holds its next samples, in order
        positions = [order.index(i) for _, i in b]
        assert positions == sorted(positions)
    # Resume: skipping k batches' worth of samples yields the remaining batches exactly.
    sampler.set_epoch(3, skip=2 * batch)
    assert list(sampler) == batches[2:] and len(sampler) == len(batches) - 2


def test_training_with_grouping_pads_less(tmp_path, monkeypatch):
    from sparse_detr.models.detector import SparseDETR
    from test_train import _config

    original, seen = SparseDETR.forward, []

    def spy(self, images, mask=None, **kwargs):
        if self.training:
            seen[-1].append(float(mask.float().mean()))
        return original(self, images, mask, **kwargs)

    monkeypatch.setattr(SparseDETR, "forward", spy)
    synth = dict(num_train=16, num_val=2, min_size=48, max_size=112, seed=3)
    for grouped in (False, True):
        seen.append([])
        cfg = _config(str(tmp_path / "data"), tmp_path / f"out{grouped}", max_iters_per_epoch=0, vis_num_images=0,
                      eval_every_epochs=0)
        cfg["data"].update(synthetic=synth, train_scales=[96], max_size=320, group_by_aspect_ratio=grouped)
        train_mod.run(config_from_dict(cfg))
    plain, grouped = seen
    assert len(plain) == len(grouped) == 8
    assert np.mean(grouped) < 0.6 * np.mean(plain), (np.mean(plain), np.mean(grouped))
    ds = build_dataset("train", dataset="synthetic", root=str(tmp_path / "data"), synthetic=synth)
    assert len(set(aspect_ratio_groups(ds.annotations.sizes))) >= 4  # the set really mixes ratios
