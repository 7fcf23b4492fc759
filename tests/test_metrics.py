"""Metrics on tiny inputs whose values were worked out by hand (see the comments)."""
import math

import pytest
import torch

from model.metrics import (BoundaryFApprox, DepthErrors, MeanIoU, MultiTaskMetrics, NormalsErrors,
                           SaliencyATRC, load_baselines, multi_task_gain)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def one_hot_logits(classes, n):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), n).permute(0, 3, 1, 2).float()


def test_miou_pools_confusion_and_skips_ignored_pixels():
    # valid pixels (label, pred): (0,0) (0,1) (1,1); the class-2 prediction sits on an ignored pixel.
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1, FP 1 -> 1/2; class 2 never counted -> mIoU 50
    label = torch.tensor([[[0, 0], [1, 255]]])
    pred = one_hot_logits([[[0, 1], [1, 2]]], 3)
    m = MeanIoU(3)
    m.update(pred, {"semseg": label})
    out = m.compute()
    assert out["mIoU"] == pytest.approx(50.0), out
    assert math.isnan(out["IoU"][2])


def test_miou_merge_equals_one_pass():
    torch.manual_seed(0)
    label = torch.randint(0, 4, (4, 5, 6))
    pred = torch.randn(4, 4, 5, 6)
    whole, a, b = MeanIoU(4), MeanIoU(4), MeanIoU(4)
    whole.update(pred, {"semseg": label})
    a.update(pred[:2], {"semseg": label[:2]})
    b.update(pred[2:], {"semseg": label[2:]})
    assert a.merge(b).compute()["mIoU"] == pytest.approx(whole.compute()["mIoU"])


def test_depth_rmse_clamps_and_skips_invalid():
    # valid pixels: pred 2 -> err 1; pred -1 clamped to 0 -> err 1; RMSE = 1.
    # log-RMSE: pred 0 clamps to 1e-9: sqrt((log 2^2 + log(1e-9)^2) / 2) = sqrt((0.4805 + 429.45)/2) = 14.66
    pred = torch.tensor([2.0, -1.0, 3.0]).view(1, 1, 1, 3)
    label = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    m = DepthErrors()
    m.update(pred, {"depth": label})
    out = m.compute()
    assert out["rmse"] == pytest.approx(1.0)
    assert out["log_rmse"] == pytest.approx(14.66, abs=0.01)


def test_normals_angles_in_degrees():
    # label (0,0,1) at three valid pixels; predictions at 0, 45 and 90 degrees (unnormalised on
    # purpose); the 4th pixel is invalid. mean 45, median 45, rmse sqrt((0+45^2+90^2)/3) = 58.09,
    # within 11.25: 1 of 3
    label = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32).T.reshape(1, 3, 1, 4)
    pred = torch.tensor([[0, 0, 2], [1, 0, 1], [3, 0, 0], [1, 0, 0]], dtype=torch.float32).T.reshape(1, 3, 1, 4)
    m = NormalsErrors()
    m.update(pred, {"normals": label})
    out = m.compute()
    assert out["mean"] == pytest.approx(45.0, abs=1e-3)
    assert out["median"] == pytest.approx(45.0, abs=0.01)
    assert out["rmse"] == pytest.approx(58.09, abs=0.01)
    assert out["within_11.25"] == pytest.approx(100 / 3)


def test_saliency_maxf_atrc_pooled_beta2_03():
    # probs 0.92, 0.62, 0.32, 0.12 with labels 1, 0, 1, 0.
    # t in 0.65..0.90: TP 1, FP 0, FN 1: P 1, R 0.5, F = 1.3*0.5/(0.3+0.5) = 0.8125 (the max)
    # t in 0.15..0.30: TP 2, FP 1: P 2/3, R 1, F = 1.3*(2/3)/(0.2+1) = 0.722
    # max mIoU: t 0.65..0.9: fg 1/2, bg 2/3 -> 0.5833 (t 0.15..0.3 ties: fg 2/3, bg 1/2)
    pred = logit([0.92, 0.62, 0.32, 0.12]).view(1, 1, 2, 2)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    m = SaliencyATRC()
    m.update(pred, {"sal": label})
    out = m.compute()
    assert out["maxF_atrc_pooled_beta2_0.3"] == pytest.approx(81.25, abs=1e-6)
    assert out["max_mIoU"] == pytest.approx(58.333, abs=1e-3)


def test_boundary_f_approx_tolerance_matching():
    # 20x20, label edge = column 10; prediction 0.9 on column 11 (1 px away) plus one stray pixel at
    # (0,0); tolerance 0.05 * diagonal 28.3 = 1.41 px. At thresholds <= 0.9: 21 predicted, 20 matched
    # -> P = 20/21; every label pixel has a prediction within 1.41 px -> R = 1; F = 40/41 = 97.56
    prob = torch.full((1, 1, 20, 20), 0.001, dtype=torch.float64)
    prob[..., :, 11] = 0.9
    prob[..., 0, 0] = 0.9
    label = torch.zeros(1, 1, 20, 20)
    label[..., :, 10] = 1
    m = BoundaryFApprox(tolerance=0.05)
    m.update(logit(prob), {"edge": label})
    out = m.compute()
    assert out["odsF_approx"] == pytest.approx(100 * 40 / 41, abs=1e-6), out


def test_multi_task_gain_against_baseline_file(tmp_path):
    # semseg mIoU 44 vs 40: +10 %; depth rmse 0.45 vs 0.5, lower is better: +10 %; Dm = +10
    base = tmp_path / "single_task.json"
    base.write_text('{"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}')
    results = {"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.45}}
    assert multi_task_gain(results, base) == pytest.approx(10.0)
    # worse depth (0.55): -10 %, Dm = 0
    assert multi_task_gain({"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.55}}, load_baselines(base)) == \
        pytest.approx(0.0)
    with pytest.raises(FileNotFoundError, match="baseline file"):
        multi_task_gain(results, tmp_path / "missing.json")


def test_multi_task_metrics_sync_with_all_reduce(tmp_path):
    # a one-process gloo group: sync must leave the pooled state unchanged
    import torch.distributed as dist
    m = MultiTaskMetrics({"semseg": 3, "depth": 1})
    batch = {"semseg": torch.tensor([[[0, 1], [2, 2]]]), "depth": torch.ones(1, 1, 2, 2)}
    m.update({"semseg": one_hot_logits([[[0, 1], [2, 1]]], 3), "depth": torch.full((1, 1, 2, 2), 2.0)}, batch)
    before = m.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        after = m.sync().compute()
    finally:
        dist.destroy_process_group()
    assert after == before
    assert before["depth"]["rmse"] == pytest.approx(1.0)
