"""Task losses (MTI-Net conventions) and the deep-supervised multi-task loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import MultiTaskLoss, balanced_bce, cross_entropy, depth_l1, normals_l1


def test_cross_entropy_ignores_255_and_is_zero_when_all_ignored():
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 3, 4, requires_grad=True)
    label = torch.randint(0, 5, (2, 3, 4))
    label[0, 0] = 255
    valid = label != 255
    ref = F.cross_entropy(pred.permute(0, 2, 3, 1)[valid], label[valid])
    assert cross_entropy(pred, label).item() == pytest.approx(ref.item(), rel=1e-6)
    empty = cross_entropy(pred, torch.full_like(label, 255))
    empty.backward()
    assert empty.item() == 0.0 and pred.grad is not None


def test_depth_l1_over_valid_pixels():
    # valid pixels (label > 0): |1-2| + |3-1| = 3 over 2 pixels = 1.5
    pred = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    label = torch.tensor([2.0, 0.0, 1.0]).view(1, 1, 1, 3)
    assert depth_l1(pred, label).item() == pytest.approx(1.5)


def test_normals_l1_normalises_prediction():
    # pixel 1: (0,0,2) -> (0,0,1) = label: 0; pixel 2: (3,0,4) -> (0.6,0,0.8) vs (0,0,1): 0.6 + 0.2;
    # pixel 3 invalid. 0.8 over 6 valid components = 0.1333
    pred = torch.tensor([[0, 0, 2], [3, 0, 4], [5, 5, 5]], dtype=torch.float32).T.reshape(1, 3, 1, 3)
    label = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32).T.reshape(1, 3, 1, 3)
    assert normals_l1(pred, label).item() == pytest.approx(0.8 / 6)


def test_balanced_bce_fixed_and_automatic_weight():
    # logits 0 -> BCE log 2 per pixel; labels 1,0,0,0.
    # pos_weight 0.95: (0.95 log2 + 0.05 * 3 log2) / 4 = 1.1 log2 / 4
    # automatic (HED): w = 3/4 negatives: (0.75 log2 + 0.25 * 3 log2) / 4 = 1.5 log2 / 4
    pred = torch.zeros(1, 1, 2, 2)
    label = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    assert balanced_bce(pred, label, 0.95).item() == pytest.approx(1.1 * math.log(2) / 4)
    assert balanced_bce(pred, label).item() == pytest.approx(1.5 * math.log(2) / 4)


def test_multi_task_loss_sums_final_and_upsampled_deep_supervision():
    torch.manual_seed(0)
    tasks = ("semseg", "depth", "edge")
    batch = {"semseg": torch.randint(0, 4, (2, 8, 8)), "depth": torch.rand(2, 1, 8, 8) + 0.5,
             "edge": (torch.rand(2, 1, 8, 8) > 0.8).float()}
    final = {"semseg": torch.randn(2, 4, 8, 8), "depth": torch.rand(2, 1, 8, 8), "edge": torch.randn(2, 1, 8, 8)}
    # constant maps upsample to themselves, so the expected deep-supervision terms are easy to write
    ds = {s: {"semseg": torch.full((2, 4, 8 // s, 8 // s), 0.3), "depth": torch.full((2, 1, 8 // s, 8 // s), 1.0),
              "edge": torch.zeros(2, 1, 8 // s, 8 // s)} for s in (2, 4)}
    weights = {"semseg": 1.0, "depth": 2.0, "edge": 50.0}
    crit = MultiTaskLoss(tasks, weights, edge_pos_weight=0.8)
    total, parts = crit({**final, "deep_supervision": ds}, batch)
    assert set(parts) == {"semseg", "depth", "edge", "semseg/ds_2", "depth/ds_2", "edge/ds_2",
                          "semseg/ds_4", "depth/ds_4", "edge/ds_4"}
    full = {t: v[:, :, :1, :1].expand_as(final[t]) for t, v in ds[2].items()}
    expected = 0.0
    for pred in (final, full, full):
        expected += cross_entropy(pred["semseg"], batch["semseg"]) + 2 * depth_l1(pred["depth"], batch["depth"]) \
            + 50 * balanced_bce(pred["edge"], batch["edge"], 0.8)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_task_loss_rejects_weights_of_other_tasks():
    with pytest.raises(ValueError, match="not in"):
        MultiTaskLoss(("semseg",), {"depth": 1.0})
