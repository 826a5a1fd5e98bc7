"""The criterion against transformers' Mask2FormerLoss on identical inputs and random points,
and the score loss against a direct computation."""
import pytest
import torch

from dups.models.criterion import CriterionConfig, SegmentationCriterion, semantic_targets
from dups.models.decoder import Prediction
from dups.models.edges import edge_map, edge_scores, token_targets
from dups.models.upsampling import UpsampleRecord


def random_case(seed=0, b=2, q=7, k=5, h=32, w=40):
    g = torch.Generator().manual_seed(seed)
    preds = [Prediction(torch.randn(b, q, k + 1, generator=g),
                        torch.randn(b, q, h // 4, w // 4, generator=g) * 3) for _ in range(3)]
    labels = torch.randint(0, k, (b, h // 8, w // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[0, :5, :7] = 255
    return preds, labels


def test_equals_transformers_mask2former_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    preds, labels = random_case()
    k = 5
    cfg = CriterionConfig(num_points=300)
    ours = SegmentationCriterion(k, cfg)
    hf_cfg = transformers.Mask2FormerConfig(
        num_labels=k, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
        train_num_points=300, oversample_ratio=3.0, importance_sample_ratio=0.75)
    theirs = Mask2FormerLoss(hf_cfg, weight_dict={})
    targets = semantic_targets(labels, k)

    torch.manual_seed(123)
    got = ours(preds, labels)
    torch.manual_seed(123)
    want = theirs(preds[-1].masks, preds[-1].logits, [t.masks for t in targets],
                  [t.classes for t in targets],
                  auxiliary_predictions=[{"masks_queries_logits": p.masks, "class_queries_logits": p.logits}
                                         for p in preds[:-1]])
    names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    compared = 0
    for ours_name, hf_name in names.items():
        torch.testing.assert_close(got[ours_name], want[hf_name])
        for i in range(2):
            torch.testing.assert_close(got[f"aux{i}_{ours_name}"], want[f"{hf_name}_{i}"])
            compared += 1
    assert compared == 6
    total = sum(2 * want[f"loss_cross_entropy{s}"] + 5 * want[f"loss_mask{s}"] + 5 * want[f"loss_dice{s}"]
                for s in ("", "_0", "_1"))
    torch.testing.assert_close(got["loss"], total)


def test_matching_finds_the_planted_assignment():
    """Queries that predict exactly the target masks (in shuffled order) are matched to them."""
    preds, labels = random_case(seed=1, b=1)
    targets = semantic_targets(labels, 5)
    n = len(targets[0].classes)
    perm = torch.randperm(7)[:n]
    logits = torch.full((1, 7, 6), -5.0)
    masks = torch.full((1, 7, 4, 5), -10.0)
    small = torch.nn.functional.interpolate(targets[0].masks[None], size=(4, 5), mode="nearest")[0]
    for t, qi in enumerate(perm):
        logits[0, qi, targets[0].classes[t]] = 5.0
        masks[0, qi] = small[t] * 20 - 10
    crit = SegmentationCriterion(5, CriterionConfig(num_points=500))
    (rows, cols), = crit.match(Prediction(logits, masks), targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {t: int(q) for t, q in enumerate(perm)}


def test_score_loss_is_the_mse_against_edge_fractions():
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 20:50, 10:33] = 3
    centres = torch.tensor([[[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]]])
    scores = torch.tensor([[0.1, 0.0, 0.3, 0.05]])
    rec = UpsampleRecord(32, centres, scores, torch.zeros(1, 0, dtype=torch.long))
    crit = SegmentationCriterion(5)
    want = ((scores - token_targets(edge_scores(labels)[32], centres, 32)) ** 2).mean()
    torch.testing.assert_close(crit.score_loss([rec], labels), want)
    assert want > 0


def test_cell_score_loss_is_the_mse_against_each_cells_edge_fraction():
    """score_cells = 2: each head output is one 16-px quarter of its 32-px token, checked
    against edge pixels counted by hand, and the loss computes the maps it was not given
    (with the run's edge radius)."""
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 20:50, 10:33] = 3
    centres = torch.tensor([[[16.0, 16.0], [48.0, 48.0]]])
    cells = torch.tensor([[[0.1, 0.0, 0.3, 0.05], [0.2, 0.0, 0.0, 0.4]]])
    rec = UpsampleRecord(32, centres, cells.mean(-1), torch.zeros(1, 0, dtype=torch.long), cells=cells)
    for radius in (0, 2):
        edge = edge_map(labels[0], radius=radius).float()
        want_cells = [[edge[y:y + 16, x:x + 16].mean() for y, x in ((0, 0), (0, 16), (16, 0), (16, 16))],
                      [edge[y:y + 16, x:x + 16].mean() for y, x in ((32, 32), (32, 48), (48, 32), (48, 48))]]
        want = ((cells - torch.tensor(want_cells)) ** 2).mean()
        crit = SegmentationCriterion(5, CriterionConfig(edge_radius=radius))
        torch.testing.assert_close(crit.score_loss([rec], labels, edge_scores(labels, radius=radius)), want)
        torch.testing.assert_close(crit.score_loss([rec], labels), want)  # maps from the labels
        assert torch.tensor(want_cells).count_nonzero() == 4  # two quarters of each token see the object


def test_root_score_loss_compares_square_roots():
    """score_root: the same fractions, compared as square roots, so a flat token predicted at
    0.04 costs 0.04 (the paper's MSE: 0.0016)."""
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 20:28, 10:20] = 3  # inside the first token only
    centres = torch.tensor([[[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]]])
    scores = torch.tensor([[0.1, 0.04, 0.3, 0.0]])
    truth = token_targets(edge_scores(labels)[32], centres, 32)
    assert truth[0, 1] == 0  # the flat token
    crit = SegmentationCriterion(5)
    plain = UpsampleRecord(32, centres, scores, torch.zeros(1, 0, dtype=torch.long))
    root = UpsampleRecord(32, centres, scores, torch.zeros(1, 0, dtype=torch.long), root=True)
    torch.testing.assert_close(crit.score_loss([root], labels), ((scores.sqrt() - truth.sqrt()) ** 2).mean())
    torch.testing.assert_close(crit.score_loss([plain], labels), ((scores - truth) ** 2).mean())
    flat = [UpsampleRecord(32, centres[:, 1:2], scores[:, 1:2], torch.zeros(1, 0, dtype=torch.long), root=r)
            for r in (False, True)]
    assert [round(float(crit.score_loss([f], labels)), 6) for f in flat] == [0.0016, 0.04]


def test_labels_out_of_range_are_a_clear_error():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 3, 3] = 200
    with pytest.raises(ValueError, match="label value 200 is outside \\[0, 150\\)"):
        semantic_targets(labels, 150)
    labels[0, 3, 3] = 255  # the ignore value is fine
    assert semantic_targets(labels, 150)[0].classes.tolist() == [0]
