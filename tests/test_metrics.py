"""Metrics on tiny inputs whose values were worked out by hand (see the comments)."""
import math

import pytest
import torch

from model.metrics import (BoundaryFApprox, DepthErrors, MeanIoU, MultiTaskMetrics, NormalsErrors,
                           SaliencyATRC, SaliencyMTI, build_metric, load_baselines, multi_task_gain)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def one_hot_logits(classes, n):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), n).permute(0, 3, 1, 2).float()


def miou_of(task, n, labels, preds, batches=None):
    """mIoU result of MeanIoU(n, task) fed [B, 1, W] label rows and predicted class rows."""
    m = MeanIoU(n, task)
    labels, preds = torch.tensor(labels).unsqueeze(1), torch.tensor(preds).unsqueeze(1)
    for i in range(len(labels)) if batches == "one_by_one" else [slice(None)]:
        label, pred = labels[i].view(-1, *labels.shape[1:]), preds[i].view(-1, *preds.shape[1:])
        m.update(one_hot_logits(pred, n), {task: label})
    return m.compute()


def test_miou_skips_ignored_pixels_and_an_absent_class_counts_zero():
    # valid pixels (label, pred): (0,0) (0,1) (1,1); the class-2 prediction sits on an ignored pixel.
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1, FP 1 -> 1/2; class 2: TP+FP+FN = 0 -> IoU 0 (not left out)
    # mIoU = (1/2 + 1/2 + 0) / 3 = 33.33 (averaging over present classes only would give 50)
    label = torch.tensor([[[0, 0], [1, 255]]])
    pred = one_hot_logits([[[0, 1], [1, 2]]], 3)
    m = MeanIoU(3)
    m.update(pred, {"semseg": label})
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 / 3), out
    assert out["IoU"] == pytest.approx([50.0, 50.0, 0.0])


@pytest.mark.parametrize("batches", ["together", "one_by_one"])
def test_miou_pools_counts_over_the_split_not_per_image(batches):
    # 3 classes, class 2 absent everywhere. image A: label 0 0 0 0, pred 0 0 0 1; image B: label 1 1 1 1,
    # pred 1 1 1 1. Pooled: class 0 TP 3, FN 1 -> 3/4; class 1 TP 4, FP 1 -> 4/5; class 2 -> 0;
    # mIoU = (0.75 + 0.8 + 0) / 3 = 51.667.
    # (per-image mean: A (3/4 + 0 + 0)/3 = 0.25, B (0 + 1 + 0)/3 = 0.333 -> 29.17; pooled over the
    # present classes only: (0.75 + 0.8)/2 = 77.5 -- both wrong)
    out = miou_of("semseg", 3, [[0, 0, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 1], [1, 1, 1, 1]], batches)
    assert out["mIoU"] == pytest.approx(155 / 3)
    assert out["IoU"] == pytest.approx([75.0, 80.0, 0.0])


def test_human_parts_skip_images_without_a_person():
    # 7 classes, 1x2 images (label -> pred):
    #   A: 0 0 -> 1 1        all 0: skipped (else class 0 gets FN 2, class 1 FP 2)
    #   B: 255 255 -> 2 2    all 255: skipped (no valid pixel anyway)
    #   C: 0 1 -> 0 1        class 0 TP 1, class 1 TP 1
    #   D: 0 255 -> 3 3      two values: kept (MTI-Net skips only |unique| == 1); class 0 FN 1, class 3 FP 1
    # class 0: 1/(1+1) = 1/2; class 1: 1/1; class 3: 0/1; classes 2, 4, 5, 6: 0
    # mIoU = (1/2 + 1) / 7 = 21.429
    labels = [[0, 0], [255, 255], [0, 1], [0, 255]]
    preds = [[1, 1], [2, 2], [0, 1], [3, 3]]
    parts = miou_of("human_parts", 7, labels, preds)
    assert parts["mIoU"] == pytest.approx(100 * 1.5 / 7)
    assert parts["IoU"] == pytest.approx([50, 100, 0, 0, 0, 0, 0])
    # semseg skips nothing: class 0 TP 1, FN 2 (A) + 1 (D) -> 1/4; class 1 TP 1, FP 2 (A) -> 1/3
    # mIoU = (1/4 + 1/3) / 7 = (7/12) / 7 = 1/12 = 8.333
    assert miou_of("semseg", 7, labels, preds)["mIoU"] == pytest.approx(100 / 12)


def test_miou_merge_equals_one_pass():
    torch.manual_seed(0)
    label = torch.randint(0, 4, (4, 5, 6))
    pred = torch.randn(4, 4, 5, 6)
    whole, a, b = MeanIoU(4), MeanIoU(4), MeanIoU(4)
    whole.update(pred, {"semseg": label})
    a.update(pred[:2], {"semseg": label[:2]})
    b.update(pred[2:], {"semseg": label[2:]})
    assert a.merge(b).compute()["mIoU"] == pytest.approx(whole.compute()["mIoU"])


def test_depth_and_normals_pool_pixels_over_the_split():
    # depth, 1x4 images: A label 2 0 0 0, pred 5 9 9 9 -> one valid pixel, error 3;
    # B label 1 1 1 0, pred 2 2 2 7 -> three valid pixels, error 1.
    # pooled RMSE = sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3) = 1.732 (the per-image mean would be (3 + 1)/2 = 2)
    depth = DepthErrors()
    depth.update(torch.tensor([[5.0, 9, 9, 9], [2, 2, 2, 7]]).view(2, 1, 1, 4),
                 {"depth": torch.tensor([[2.0, 0, 0, 0], [1, 1, 1, 0]]).view(2, 1, 1, 4)})
    assert depth.compute()["rmse"] == pytest.approx(math.sqrt(3))
    # normals, label (0,0,1) where valid: A one valid pixel predicted (1,0,0) -> 90 deg; B three valid
    # pixels predicted (0,0,5) -> 0 deg. pooled mean = 90/4 = 22.5 (per-image mean would be 45);
    # median of 90, 0, 0, 0 -> the first 0.01-degree bin, 0.005
    up, zero, x = [0.0, 0, 1], [0.0, 0, 0], [1.0, 0, 0]
    label = torch.tensor([[up, zero, zero, zero], [up, up, up, zero]]).permute(0, 2, 1).unsqueeze(2)
    pred = torch.tensor([[x, x, x, x], [[0, 0, 5.0]] * 3 + [x]]).permute(0, 2, 1).unsqueeze(2)
    normals = NormalsErrors()
    normals.update(pred, {"normals": label})
    out = normals.compute()
    assert out["mean"] == pytest.approx(22.5, abs=1e-6)
    assert out["median"] == pytest.approx(0.005)


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


SAL_PROBS = [[0.92, 0.62, 0.32, 0.12],   # image 1
             [0.72, 0.42, 0.27, 0.10],   # image 2
             [0.12, 0.32, 0.62, 0.97],   # image 3: no positive label, 0.97 on an ignored pixel
             [0.90, 0.90, 0.90, 0.90]]   # image 4: all ignored
SAL_LABELS = [[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 255], [255, 255, 255, 255]]


def sal_batch(rows):
    return (logit([SAL_PROBS[i] for i in rows]).view(-1, 1, 2, 2),
            {"sal": torch.tensor([SAL_LABELS[i] for i in rows], dtype=torch.float32).view(-1, 1, 2, 2)})


def test_saliency_mti_averages_jaccard_precision_recall_over_images():
    # thresholds 0.20, 0.25, ..., 0.90 (15), positive where prob > t; per image (Jaccard, P, R):
    #   image 1 (labels 1 0 1 0):  t < 0.32 (3 thr): pos .92 .62 .32: TP 2 FP 1 FN 0 -> (2/3, 2/3, 1)
    #                              0.35..0.60 (6):   pos .92 .62:     TP 1 FP 1 FN 1 -> (1/3, 1/2, 1/2)
    #                              0.65..0.90 (6):   pos .92:         TP 1 FP 0 FN 1 -> (1/2, 1, 1/2)
    #   image 2 (labels 1 1 1 0):  0.20, 0.25:       TP 3            -> (1, 1, 1)
    #                              0.30..0.40 (3):   TP 2 FN 1       -> (2/3, 1, 2/3)
    #                              0.45..0.70 (6):   TP 1 FN 2       -> (1/3, 1, 1/3)
    #                              0.75..0.90 (4):   TP 0 FN 3       -> (0, 0 [0/0], 0)
    #   image 3 (labels 0 0 0 ign): t < 0.62: FP >= 1, TP 0          -> (0, 0, 0 [0/0])
    #                              0.65..0.90: nothing predicted, nothing labelled -> (1 [MTI-Net], 0, 0)
    #   image 4: no valid pixel -> skipped (3 images)
    # means over the 3 images, F = 2PR/(P+R):
    #   0.20, 0.25: J (2/3+1+0)/3 = 5/9, P (2/3+1+0)/3 = 5/9, R (1+1+0)/3 = 2/3 -> F = (20/27)/(11/9) = 20/33
    #   0.30:       J (2/3+2/3)/3 = 4/9, P 5/9, R (1+2/3)/3 = 5/9                -> F = 5/9
    #   0.35, 0.40: J (1/3+2/3)/3 = 1/3, P (1/2+1)/3 = 1/2, R (1/2+2/3)/3 = 7/18  -> F = (7/18)/(16/18) = 7/16
    #   0.45..0.60: J 2/9, P 1/2, R (1/2+1/3)/3 = 5/18                           -> F = (5/18)/(14/18) = 5/14
    #   0.65, 0.70: J (1/2+1/3+1)/3 = 11/18, P (1+1+0)/3 = 2/3, R 5/18           -> F = (10/27)/(17/18) = 20/51
    #   0.75..0.90: J (1/2+0+1)/3 = 1/2, P 1/3, R (1/2)/3 = 1/6                  -> F = (1/9)/(1/2) = 2/9
    # maxF = 20/33 = 60.606; mIoU = 11/18 = 61.111 (with Jaccard 0 for image 3 it would be 5/9 = 55.56).
    # (pooling pixels instead, at t = 0.2: TP 5, FP 3, FN 0 -> F = 2 (5/8) / (13/8) = 10/13 = 76.9)
    m = SaliencyMTI()
    m.update(*sal_batch([0, 1, 2, 3]))
    out = m.compute()
    assert out["maxF"] == pytest.approx(100 * 20 / 33)
    assert out["mIoU"] == pytest.approx(100 * 11 / 18)
    # the states add up: image 1 in one meter, images 2-4 in another (as distributed evaluation merges)
    a, b = SaliencyMTI(), SaliencyMTI()
    a.update(*sal_batch([0]))
    b.update(*sal_batch([1, 2, 3]))
    assert a.merge(b).compute() == pytest.approx(out)


def test_saliency_mti_threshold_is_strict():
    # MTI-Net binarises with pred > t. Labels 1 0 0, probs 0.5 (logit 0, exactly the 7th threshold 0.5),
    # 0.47, 0.12: t 0.20..0.45: pos 0.5, 0.47 -> J 1/2; t = 0.5: nothing (0.5 > 0.5 is false) -> J 0;
    # t > 0.5: nothing -> J 0. mIoU = 50 (with >= it would be 100 at t = 0.5)
    m = SaliencyMTI()
    m.update(torch.tensor([0.0, logit(0.47), logit(0.12)]).view(1, 1, 1, 3),
             {"sal": torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)})
    assert m.compute()["mIoU"] == pytest.approx(50.0)


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
    assert out["maxF_atrc"] == pytest.approx(81.25, abs=1e-6)
    assert out["mIoU_atrc"] == pytest.approx(58.333, abs=1e-3)
    # the "sal" metric reports both conventions; MTI-Net's (prob > t, 0.20..0.90, per image) on this one
    # image: t < 0.32 (J 2/3, P 2/3, R 1, F 4/5), 0.35..0.60 (J 1/3, F 1/2), 0.65..0.90 (J 1/2, P 1,
    # R 1/2, F 2/3) -> maxF 80, mIoU 66.667
    both = build_metric("sal")
    both.update(pred, {"sal": label})
    assert both.compute() == pytest.approx({"maxF": 80.0, "mIoU": 200 / 3, "maxF_atrc": 81.25,
                                            "mIoU_atrc": 175 / 3})


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
    # semseg mIoU 44 vs 40: +10 %; depth rmse 0.45 vs 0.5, lower is better: -(0.45-0.5)/0.5 = +10 %; Dm = +10
    base = tmp_path / "single_task.json"
    base.write_text('{"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}')
    results = {"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.45}}
    assert multi_task_gain(results, base) == pytest.approx(10.0)
    # worse depth (0.55): -10 %, Dm = 0
    assert multi_task_gain({"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.55}}, load_baselines(base)) == \
        pytest.approx(0.0)
    # both worse: semseg (38-40)/40 = -5 %; depth -(0.6-0.5)/0.5 = -20 %; Dm = (-5 - 20)/2 = -12.5
    assert multi_task_gain({"semseg": {"mIoU": 38.0}, "depth": {"rmse": 0.6}}, base) == pytest.approx(-12.5)
    # an `evaluate --json` file (results under "metrics") works as a baseline file too
    wrapped = tmp_path / "eval.json"
    wrapped.write_text('{"checkpoint": "x.pt", "loss": 1.0, "metrics": ' + base.read_text() + '}')
    assert multi_task_gain(results, wrapped) == pytest.approx(10.0)
    with pytest.raises(FileNotFoundError, match="baseline file"):
        multi_task_gain(results, tmp_path / "missing.json")


def test_multi_task_gain_three_tasks_uses_saliency_miou():
    # semseg mIoU 44 vs 40: +10 %; normals mean 18 vs 20, lower is better: -(18-20)/20 = +10 %;
    # sal mIoU 60 vs 64: (60-64)/64 = -6.25 % (MTI-Net's Dm takes saliency's mIoU; maxF 80 vs 70 would be
    # +14.29 %). Dm = (10 + 10 - 6.25)/3 = 13.75/3 = 4.5833
    base = {"semseg": {"mIoU": 40.0}, "normals": {"mean": 20.0}, "sal": {"mIoU": 64.0, "maxF": 70.0}}
    results = {"semseg": {"mIoU": 44.0}, "normals": {"mean": 18.0}, "sal": {"mIoU": 60.0, "maxF": 80.0}}
    assert multi_task_gain(results, base) == pytest.approx(13.75 / 3)
    # restricted to two of them: (10 + 10)/2 = 10
    assert multi_task_gain(results, base, tasks=["semseg", "normals"]) == pytest.approx(10.0)


def test_multi_task_metrics_merge_equals_one_pass():
    torch.manual_seed(0)
    outputs = {"semseg": 3, "human_parts": 7, "depth": 1, "sal": 1}
    batch = {"semseg": torch.randint(0, 3, (4, 5, 6)), "human_parts": torch.randint(0, 7, (4, 5, 6)),
             "depth": torch.rand(4, 1, 5, 6), "sal": torch.randint(0, 2, (4, 1, 5, 6)).float()}
    batch["human_parts"][1] = 255                          # an image without a person
    out = {t: torch.randn(4, n, 5, 6) for t, n in outputs.items()}
    whole, a, b = MultiTaskMetrics(outputs), MultiTaskMetrics(outputs), MultiTaskMetrics(outputs)
    whole.update(out, batch)
    a.update({t: v[:1] for t, v in out.items()}, {t: v[:1] for t, v in batch.items()})
    b.update({t: v[1:] for t, v in out.items()}, {t: v[1:] for t, v in batch.items()})
    merged, one = a.merge(b).compute(), whole.compute()
    for t in outputs:
        for k in one[t]:
            assert merged[t][k] == pytest.approx(one[t][k]), (t, k)


def test_multi_task_metrics_sync_with_all_reduce(tmp_path):
    # a one-process gloo group: sync must leave the pooled state unchanged
    import torch.distributed as dist
    m = MultiTaskMetrics({"semseg": 3, "depth": 1, "sal": 1})
    batch = {"semseg": torch.tensor([[[0, 1], [2, 2]]]), "depth": torch.ones(1, 1, 2, 2),
             "sal": torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)}
    m.update({"semseg": one_hot_logits([[[0, 1], [2, 1]]], 3), "depth": torch.full((1, 1, 2, 2), 2.0),
              "sal": logit([0.92, 0.62, 0.32, 0.12]).view(1, 1, 2, 2)}, batch)
    before = m.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        after = m.sync().compute()
    finally:
        dist.destroy_process_group()
    assert after == before
    assert before["depth"]["rmse"] == pytest.approx(1.0)
    assert before["sal"]["maxF"] == pytest.approx(80.0)     # as in test_saliency_maxf_atrc_pooled_beta2_03
