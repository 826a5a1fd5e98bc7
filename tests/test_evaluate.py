"""Evaluation: aAcc / mAcc / mIoU against torchmetrics, sliding window and multi-scale consistency."""
import math

import pytest
import torch

from dups.models import RatioPolicy
from dups.models.edges import edge_scores
from dups.models.segmentor import build_segmentor
from dups.config import EvalConfig
from dups.evaluation.evaluate import (_probs, confusion, evaluate, multi_scale, scores_from_confusion,
                               sliding_window)
from dups.evaluation.measure import count_gmacs


def test_aacc_macc_miou_equal_torchmetrics_in_percent():
    tm = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    classes = 6
    label = torch.randint(0, classes, (4, 40, 50), generator=g)
    label[:, :5] = 255
    pred = torch.where(torch.rand(label.shape, generator=g) < 0.7, label.clamp(max=classes - 1),
                       torch.randint(0, classes, label.shape, generator=g))
    conf = sum(confusion(p, l, classes) for p, l in zip(pred, label))
    got = scores_from_confusion(conf)
    tmc = tm.classification
    iou = tmc.MulticlassJaccardIndex(num_classes=classes, ignore_index=255, average="none")(pred, label)
    acc = tmc.MulticlassAccuracy(num_classes=classes, ignore_index=255, average="none")(pred, label)
    aacc = tmc.MulticlassAccuracy(num_classes=classes, ignore_index=255, average="micro")(pred, label)
    assert got["IoU"] == pytest.approx((100 * iou).tolist()) and got["Acc"] == pytest.approx((100 * acc).tolist())
    assert got["mIoU"] == pytest.approx(100 * float(iou.mean()))
    assert got["mAcc"] == pytest.approx(100 * float(acc.mean()))
    assert got["aAcc"] == pytest.approx(100 * float(aacc))


def test_classes_absent_from_prediction_and_label_are_left_out():
    label = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    got = scores_from_confusion(confusion(pred, label, 4))
    assert got["IoU"][:2] == [50.0, pytest.approx(200 / 3)] and all(math.isnan(v) for v in got["IoU"][2:])
    assert got["mIoU"] == pytest.approx((50 + 200 / 3) / 2)
    assert got["Acc"][:2] == [50.0, 100.0] and got["mAcc"] == 75.0 and got["aAcc"] == 75.0


@torch.no_grad()
def test_one_window_and_one_scale_equal_single_scale():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5).eval()
    image = torch.randn(1, 3, 128, 128)
    policy = RatioPolicy.from_preset("fixed", "ade20k")
    single, _ = _probs(model, image, policy, (128, 128))
    window, _ = sliding_window(model, image, policy, (128, 128), window=128)
    torch.testing.assert_close(window, single)
    scaled, _ = multi_scale(model, image, policy, (128, 128), (128,), flip=False)
    torch.testing.assert_close(scaled, single)
    # two overlapping windows over a wider image: every pixel covered, probabilities averaged
    wide = torch.randn(1, 3, 128, 192)
    probs, _ = sliding_window(model, wide, policy, (128, 192), window=128)
    assert probs.shape == (1, 5, 128, 192) and torch.isfinite(probs).all()
    left, _ = _probs(model, wide[..., :128], policy, (128, 128))
    torch.testing.assert_close(probs[..., :64], left[..., :64])  # only the first window there


def test_cityscapes_windows_are_segformers_three_and_their_flops_count():
    from dups.config import load_config
    from dups.evaluation.evaluate import window_starts
    cfg = load_config("finetune_cityscapes_tiny")
    assert window_starts(2048, cfg.data.crop, cfg.eval.window_stride) == [0, 768, 1024]
    assert window_starts(1024, cfg.data.crop, cfg.eval.window_stride) == [0]
    assert window_starts(2048, 1024) == [0, 1024]  # stride 0: as few as cover
    # the same at 1/8 scale: three windows cost three single windows' FLOPs
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5)
    label = torch.zeros(128, 256, dtype=torch.long)
    sample = {"image": torch.randn(3, 128, 256), "label": label, "size": (128, 256),
              "scores": edge_scores(label), "key": "0"}
    full = RatioPolicy("full")
    three = evaluate(model, [sample], 5, full, EvalConfig(sliding_window=True, window_stride=96),
                     128, torch.device("cpu"))
    one = evaluate(model, [{**sample, "image": sample["image"][..., :128], "size": (128, 128),
                            "label": label[:, :128]}], 5, full, EvalConfig(), 128, torch.device("cpu"))
    assert three.gflops_mean == pytest.approx(3 * one.gflops_mean, rel=1e-3)


def test_evaluate_reports_flops_tokens_and_pictures():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5)
    samples = []
    for i in range(3):
        label = torch.randint(0, 5, (96, 128))
        samples.append({"image": torch.randn(3, 96, 128), "label": label, "size": (96, 128),
                        "scores": {s: torch.zeros(96 // s + (96 % s > 0), 128 // s) for s in (32, 16, 8)},
                        "key": str(i)})
    res = evaluate(model, samples, 5, RatioPolicy.from_preset("fixed", "ade20k"), EvalConfig(), 128,
                   torch.device("cpu"), pictures=1)
    assert res.images == 3 and res.gflops_std == pytest.approx(0, abs=1e-9)
    # the model's multiply-adds, as the benchmarks count them (all attention kernels included)
    with torch.no_grad():
        want, _ = count_gmacs(_probs, model.eval(), samples[0]["image"][None],
                              RatioPolicy.from_preset("fixed", "ade20k"), (96, 128))
    assert res.gflops_mean == pytest.approx(want, rel=1e-9)
    assert len(res.tokens_per_stage) == 4 and res.tokens_per_stage[0] == 12
    assert len(res.pictures) == 1 and res.pictures[0].size[1] == 96
    assert "mIoU" in res.table([f"c{i}" for i in range(5)])
    # the mIoU of the model's own predictions, computed independently (torchmetrics)
    tm = pytest.importorskip("torchmetrics")
    policy = RatioPolicy.from_preset("fixed", "ade20k")
    with torch.no_grad():
        preds = torch.stack([_probs(model.eval(), s["image"][None], policy, (96, 128))[0].argmax(1)[0]
                             for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    want = tm.classification.MulticlassJaccardIndex(num_classes=5, average="none")(preds, labels)
    assert res.mIoU == pytest.approx(100 * float(want.mean()))
    assert res.per_class_iou == pytest.approx((100 * want).tolist())


def boundary_sample() -> dict:
    """A 96 x 128 evaluation sample with one vertical boundary and a corner, and its score maps."""
    from dups.models.edges import edge_scores
    label = torch.zeros(96, 128, dtype=torch.long)
    label[:, 40:] = 1
    label[70:, 90:] = 2
    return {"image": torch.randn(3, 96, 128), "label": label, "size": (96, 128),
            "scores": edge_scores(label), "key": "0"}


def test_selection_against_the_ground_truth_per_upsampling_block():
    """Full upsampling splits every candidate, so the split ratio and the edge recall are 1 and
    the ground truth's ratio is the share of patches whose edge fraction exceeds tau_s,
    computed here from the score maps alone; fixed beta splits floor(N beta_s) of N."""
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5)
    sample = boundary_sample()
    maps = sample["scores"]
    full = RatioPolicy.from_preset("full", "ade20k")
    res = evaluate(model, [sample], 5, full, EvalConfig(), 128, torch.device("cpu"))
    assert res.split_ratio == [1.0, 1.0, 1.0] and res.edge_recall == [1.0, 1.0, 1.0]
    want = [float((maps[s] > tau).float().mean()) for s, tau in zip((32, 16, 8), full.tau)]
    assert res.oracle_ratio == pytest.approx(want) and 0 < min(want) and max(want) < 1
    assert res.metrics()["val/oracle_ratio_block2"] == pytest.approx(want[1])
    assert "edge tokens split 100% / 100% / 100%" in res.table([f"c{i}" for i in range(5)])
    assert len(res.score_auc) == 3 and all(0 <= a <= 1 for a in res.score_auc)
    assert "val/score_auc_block3" in res.metrics() and "val/flat_kept_block1" in res.metrics()

    fixed = RatioPolicy.from_preset("fixed", "ade20k")
    res = evaluate(model, [sample], 5, fixed, EvalConfig(), 128, torch.device("cpu"))
    n, want = 12, []
    for beta in fixed.beta:
        k = int(n * beta)
        want.append(k / n)
        n = 4 * k
    assert res.split_ratio == pytest.approx(want)
    assert all(0 <= r <= 1 for r in res.edge_recall)


def test_selection_counts_and_their_summary_by_hand():
    from dups.evaluation.evaluate import _selection_counts, _selection_summary
    edge = torch.tensor([True, True, False, False, True])
    assert _selection_counts(torch.tensor([0, 2]), edge) == (2, 5, 3, 1)
    # two images, two blocks; the second image's second block had no candidates
    summary = _selection_summary([[(2, 5, 3, 1), (1, 4, 0, 0)], [(3, 3, 1, 1), (0, 0, 0, 0)]])
    assert summary["split_ratio"] == pytest.approx([(2 / 5 + 1) / 2, 1 / 4])
    assert summary["oracle_ratio"] == pytest.approx([(3 / 5 + 1 / 3) / 2, 0])
    assert summary["edge_recall"][0] == pytest.approx(2 / 4) and math.isnan(summary["edge_recall"][1])


def test_score_head_quality_by_hand():
    """AUC counted pair by pair (ties half) and the flat tokens kept under tau, two images pooled."""
    from dups.evaluation.evaluate import _head_quality
    import numpy as np
    tau = (0.01, 0.02)
    # block 1: edges (true > 0.01) predicted 0.05, 0.02; flat predicted 0.0, 0.02, 0.03
    img1 = [(np.array([0.05, 0.0, 0.02]), np.array([0.06, 0.0, 0.005])),
            (np.array([0.3]), np.array([0.0]))]
    img2 = [(np.array([0.02, 0.03]), np.array([0.02, 0.01])), (np.zeros(0), np.zeros(0))]
    out = _head_quality([img1, img2], tau)
    pairs = [(e, f) for e in (0.05, 0.02) for f in (0.0, 0.02, 0.03)]
    want = sum(1.0 if e > f else 0.5 if e == f else 0.0 for e, f in pairs) / len(pairs)
    assert out["score_auc"][0] == pytest.approx(want)  # 3.5 / 6
    assert out["flat_kept"][0] == pytest.approx(1 / 3)  # only 0.0 is at or under 0.01
    assert math.isnan(out["score_auc"][1]) and out["flat_kept"][1] == 0.0  # no edge token; 0.3 > 0.02


def test_images_whose_sides_are_not_multiples_of_32_evaluate():
    """ADE20K's validation images have any size: the image is padded to multiples of 32 and
    its score maps (ceil(H/s) x ceil(W/s), from the label) do not reach the padding's tokens,
    which count as edge-free. (Evaluation crashed on such images: index out of bounds.)"""
    import torch.nn.functional as F
    from dups.models.edges import edge_scores
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5)
    label = torch.zeros(100, 150, dtype=torch.long)
    label[:, 60:] = 1
    label[80:, 100:] = 2
    maps = edge_scores(label)
    sample = {"image": F.pad(torch.randn(3, 100, 150), (0, 10, 0, 28)), "label": label,
              "size": (100, 150), "scores": maps, "key": "0"}
    full = RatioPolicy.from_preset("full", "ade20k")
    res = evaluate(model, [sample], 5, full, EvalConfig(), 128, torch.device("cpu"))
    cells = {32: 4 * 5, 16: 8 * 10, 8: 16 * 20}  # of the padded 128 x 160 image
    want = [float((maps[s] > tau).sum()) / cells[s] for s, tau in zip((32, 16, 8), full.tau)]
    assert res.oracle_ratio == pytest.approx(want) and res.images == 1
    assert math.isfinite(res.score_mse)


def test_oracle_evaluation_splits_exactly_the_ground_truth_edge_tokens():
    """With the ground truth choosing (Table 7's oracle), eq. 1 splits the candidates whose true
    edge fraction exceeds tau_s and no others: split ratio = ground-truth ratio, recall 1."""
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5)
    sample = boundary_sample()
    policy = RatioPolicy.from_preset("per_image", "ade20k")
    res = evaluate(model, [sample], 5, policy, EvalConfig(), 128, torch.device("cpu"), oracle=True)
    assert res.split_ratio == pytest.approx(res.oracle_ratio) and res.edge_recall == [1.0, 1.0, 1.0]
    assert max(res.split_ratio) < 1
    with pytest.raises(ValueError, match="single-scale only"):
        evaluate(model, [sample], 5, policy, EvalConfig(flip=True), 128, torch.device("cpu"), oracle=True)


def test_collectives_run_on_the_backends_device():
    """NCCL takes only CUDA tensors: every collective's device is collective_device()'s choice."""
    import torch.distributed as dist

    from dups.engine.distributed import all_reduce_sum, collective_device, free_port

    assert collective_device("nccl") == torch.device("cuda", 0)
    assert collective_device("NCCL").type == "cuda"
    assert collective_device("gloo") == torch.device("cpu")
    counts = torch.arange(4, dtype=torch.float64)
    ours = not dist.is_initialized()  # earlier tests may leave their one-rank group up
    if ours:
        assert all_reduce_sum(counts) is counts  # no process group: itself
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cpu")
        summed = all_reduce_sum(counts)
        assert torch.equal(summed, counts) and summed.device == counts.device
    finally:
        if ours:
            dist.destroy_process_group()


def test_labels_outside_the_classes_are_an_error_naming_the_sample():
    label = torch.tensor([[0, 1], [255, 7]])
    pred = torch.zeros(2, 2, dtype=torch.long)
    assert confusion(pred, label, 8).sum() == 3  # 255 is ignored
    with pytest.raises(ValueError, match=r"sample ADE_val_1: label values \[7\] are outside the 4 classes"):
        confusion(pred, label, 4, name="ADE_val_1")
