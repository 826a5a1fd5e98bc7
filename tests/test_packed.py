"""Eq. 1 on a batch: images with different budgets run as one packed (padded) batch and each
gets exactly what it gets alone; neighbour ties are broken the same way everywhere."""
import math

import pytest
import torch

from dups.models import RatioPolicy
from dups.models.attention import cluster_neighbourhood
from dups.models.decoder.densify import cover_pyramid
from dups.models.edges import edge_scores, token_targets
from dups.apis.inference import inference_model
from dups.models.segmentor import build_segmentor
from dups.data.synth import tensor_scenes


def test_padded_budget_rounds_up_to_the_bucket():
    counts = torch.tensor([3, 17, 9])
    assert RatioPolicy("per_image").padded_budget(100, counts) == 17
    assert RatioPolicy("per_image", bucket=0.1).padded_budget(100, counts) == 20
    assert RatioPolicy("per_image", bucket=0.1).padded_budget(18, counts) == 18  # never past N
    assert RatioPolicy("per_image", bucket=0.1).padded_budget(100, torch.zeros(3, dtype=torch.long)) == 0
    with pytest.raises(ValueError, match="bucket"):
        RatioPolicy("per_image", bucket=1.5)
    assert RatioPolicy("per_image").packs(4, training=True)  # eq. 1 in training too: a switch
    assert not RatioPolicy("dynamic").packs(4, training=True)  # the paper's: eq. 2 in training
    assert RatioPolicy("dynamic").packs(4, training=False) and not RatioPolicy("dynamic").packs(1, False)


def _images(height: int = 192, width: int = 256):
    """Four scenes. At 192 x 256 every image has at least a neighbourhood's 48 tokens (the
    stem's 6 x 8); at 128 x 160 (4 x 5) some keys of a packed batch are padding, masked."""
    images, labels = tensor_scenes(4, size=256, seed=3)
    return images[..., :height, :width], labels[:, :height, :width]


@pytest.mark.parametrize("chooser,size", [("oracle", (192, 256)), ("heads", (192, 256)),
                                          ("heads, bucketed", (192, 256)), ("oracle", (128, 160)),
                                          ("heads", (128, 160))])
@torch.no_grad()
def test_packed_batch_equals_each_image_alone(chooser, size):
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5).eval()
    images, labels = _images(*size)
    if chooser == "oracle":  # the ground truth's edge fractions choose, with the preset's tau
        policy, maps = RatioPolicy.from_preset("per_image", "ade20k"), edge_scores(labels)
    else:  # an untrained head scores around 0: tau = 0 splits a different share of each image
        policy, maps = RatioPolicy("per_image", tau=(0.0, 0.0, 0.0)), None
    if chooser.endswith("bucketed"):
        policy.bucket = 0.25
    packed = model(images, policy, maps)
    alone_counts = []
    for i in range(len(images)):
        one = model(images[i:i + 1], policy, {p: m[i:i + 1] for p, m in maps.items()} if maps else None)
        torch.testing.assert_close(packed.final.logits[i:i + 1], one.final.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed.final.masks[i:i + 1], one.final.masks, rtol=0, atol=1e-5)
        for rec, rec1 in zip(packed.records, one.records):
            centres, _, selected = rec.of_image(i)
            centres1, _, selected1 = rec1.of_image(0)
            assert torch.equal(centres[selected], centres1[selected1])
        alone_counts.append(one.tokens_per_stage)
    # the images really had different budgets, so the batch carried padding
    assert len({tuple(c) for c in alone_counts}) == len(images)
    assert any(not bool(r.chosen.all()) for r in packed.records)
    assert packed.tokens_per_stage == pytest.approx(torch.tensor(alone_counts, dtype=torch.float64).mean(0).tolist())


@torch.no_grad()
def test_bucketed_single_image_equals_unbucketed_and_predict_packs():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5).eval()
    images, _ = _images()
    policy = RatioPolicy("per_image", tau=(0.0, 0.0, 0.0))
    plain = model(images[:1], policy)
    bucketed = model(images[:1], RatioPolicy("per_image", tau=(0.0, 0.0, 0.0), bucket=0.25))
    assert bucketed.tokens_per_stage == plain.tokens_per_stage
    for rec in bucketed.records:  # widths are whole buckets (or every candidate)
        n, k = rec.centres.shape[1], rec.selected.shape[1]
        assert k % math.ceil(n / 4) == 0 or k == n
    assert not all(bool(rec.chosen.all()) for rec in bucketed.records)
    torch.testing.assert_close(bucketed.final.masks, plain.final.masks, rtol=0, atol=1e-5)
    model.encoder.ratio_policy = policy
    together = inference_model(model, images)  # one packed forward
    for i, lab in enumerate(together):
        assert torch.equal(lab, inference_model(model, images[i:i + 1])[0])


def test_training_packed_scores_only_real_candidates():
    """``upsampling.policy=per_image`` trains with eq. 1 per image: the score loss of the packed
    batch is the MSE pooled over each image's own candidates, and gradients stay finite."""
    from dups.models.criterion import SegmentationCriterion

    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5).train()
    images, labels = _images()
    policy, maps = RatioPolicy("per_image", tau=(0.0, 0.0, 0.0)), edge_scores(labels)
    criterion = SegmentationCriterion(5)
    packed = model(images, policy)
    assert any(not bool(r.chosen.all()) for r in packed.records)
    squares, counts = [0.0] * 3, [0] * 3  # per block, pooled over the images run alone
    with torch.no_grad():  # dups_demo has no drop-path: train mode is deterministic
        for i in range(len(images)):
            for b, rec in enumerate(model(images[i:i + 1], policy).records):
                target = token_targets(maps[rec.patch][i:i + 1], rec.centres, rec.patch)
                squares[b] += float(((rec.scores - target) ** 2).sum())
                counts[b] += rec.scores.numel()
    per_block = [criterion.score_loss([r], labels, maps) for r in packed.records]
    assert [float(v.detach()) for v in per_block] == pytest.approx([s / c for s, c in zip(squares, counts)], rel=1e-5)
    loss = sum(per_block)
    assert float(loss.detach()) > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_neighbour_ties_go_to_the_lower_index_and_padding_is_nobodys_key():
    # a 6 x 6 lattice: each cluster's mean centre is equidistant from many tokens
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    centres = (torch.stack([xs, ys], -1).reshape(1, 36, 2) * 8 + 4)
    nbhd = cluster_neighbourhood(centres, unit=8.0, cluster_size=4, nbhd_size=10, candidate_clusters=100)
    for g in range(nbhd.groups):
        members = nbhd.order[0, 4 * g:4 * g + 4]
        mean = centres[0, members].mean(0)
        d = ((centres[0] - mean) ** 2).sum(-1).tolist()
        want = sorted(range(36), key=lambda j: (d[j], j))[:10]  # ties to the lower index
        assert sorted(nbhd.key_index[0, g].tolist()) == sorted(want)
    # padding rows (anywhere, here in the middle) change nothing for the real rows
    pad = torch.tensor([[[12.0, 12.0]] * 5])
    mixed = torch.cat([centres[:, :20], pad, centres[:, 20:]], 1)
    valid = torch.ones(1, 41, dtype=torch.bool)
    valid[0, 20:25] = False
    packed = cluster_neighbourhood(mixed, unit=8.0, cluster_size=4, nbhd_size=10, candidate_clusters=3,
                                   valid=valid)
    alone = cluster_neighbourhood(centres, unit=8.0, cluster_size=4, nbhd_size=10, candidate_clusters=3)
    row = torch.cat([torch.arange(20), torch.full((5,), -1), torch.arange(20, 36)])  # packed row -> alone row
    assert torch.equal(row[packed.order[0, :36]], alone.order[0])
    assert torch.equal(row[packed.key_index[0, :alone.groups]].sort(-1).values, alone.key_index[0].sort(-1).values)


def test_padding_paints_no_cell():
    coarse = torch.tensor([[[16.0, 16.0], [48.0, 16.0]]])  # two 32-px tokens cover 32 x 64
    fine = torch.tensor([[[8.0, 8.0], [40.0, 8.0]]])  # 16-px tokens: one real, one padding
    valid = [None, torch.tensor([[True, False]])]
    maps = cover_pyramid([coarse, fine], [32, 16], 32, 64, valid)
    assert maps[1][0].tolist() == [2, 0, 1, 1, 0, 0, 1, 1]  # the padding's cell keeps token 1
