"""Segmentation and classification models: sizes, shapes, sparse->dense, and that they learn."""
import numpy as np
import pytest
import torch
from torch import nn

from dups.apis.inference import inference_model
from dups.models import RatioPolicy
from dups.models.classifier import build_classifier, load_backbone
from dups.models.criterion import CriterionConfig, SegmentationCriterion
from dups.models.decoder.densify import cover_pyramid
from dups.models.edges import edge_scores, token_targets
from dups.models.segmentor import build_segmentor, oracle_maps, semantic_probabilities
from dups.models.upsampling import eq1_painters
from dups.data.synth import tensor_scenes

PAPER_PARAMS_M = {"dups_tiny": 48.5, "dups_small": 61.7, "dups_base": 111.5}  # Table 2


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_the_paper(name):
    model = build_segmentor(name, num_classes=150)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.05, params


def test_cover_pyramid_paints_the_finest_token():
    # one 32-px token over a 64x32 image's left half... and right half, one 16-px child
    centres = [torch.tensor([[[16.0, 16.0], [48.0, 16.0]]]), torch.tensor([[[40.0, 8.0]]])]
    coarse, fine = cover_pyramid(centres, [32, 16], height=32, width=64)
    assert coarse.tolist() == [[0, 1]]
    # grid 2 x 4 cells of 16 px: token 0 covers cols 0-1, token 1 cols 2-3, child (id 2) cell (0, 2)
    assert fine.tolist() == [[0, 0, 2, 1, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="uncovered"):
        cover_pyramid([centres[0][:, :1]], [32], height=32, width=64)
    with pytest.raises(ValueError, match="halving"):
        cover_pyramid(centres, [32, 8], height=32, width=64)


def brute_force_cover(centres, patches, stride, height, width):
    """For every stride-s cell centre, the last token (levels coarsest first, painting
    order) whose patch square contains it; -1 where none does."""
    pts = np.concatenate([c.numpy() for c in centres])
    sides = np.concatenate([np.full(len(c), p, float) for c, p in zip(centres, patches)])
    ys, xs = np.mgrid[0:height // stride, 0:width // stride]
    cells = (np.stack([xs.ravel(), ys.ravel()], 1) + 0.5) * stride
    inside = (np.abs(cells[:, None] - pts[None]) < sides[None, :, None] / 2).all(-1)  # (cells, tokens)
    last = inside.shape[1] - 1 - inside[:, ::-1].argmax(1)
    return np.where(inside.any(1), last, -1)


@torch.no_grad()
def test_cover_pyramid_matches_brute_force_on_encoder_tokens():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=5).eval()
    enc = model.encoder(torch.randn(1, 3, 96, 128), RatioPolicy("random", random_ratio=0.4))
    levels = enc.levels[::-1]  # patch 32, 16, 8, 4
    centres, patches = [lv.centres for lv in levels], [lv.patch for lv in levels]
    covers = cover_pyramid(centres, patches, 96, 128)
    for i, p in enumerate(patches):
        expected = brute_force_cover([c[0] for c in centres[: i + 1]], patches[: i + 1], p, 96, 128)
        assert (expected >= 0).all()
        assert covers[i][0].tolist() == expected.tolist(), p


@torch.no_grad()
def test_shapes_deep_supervision_and_semantic_inference():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=7).eval()
    out = model(torch.randn(2, 3, 96, 128), RatioPolicy.from_preset("fixed", "ade20k"))
    assert len(out.predictions) == model.decoder.layers.__len__() + 1
    assert out.final.logits.shape == (2, 16, 8) and out.final.masks.shape == (2, 16, 24, 32)
    probs = semantic_probabilities(out.final, (96, 128))
    manual = torch.einsum("bqk,bqhw->bkhw", out.final.logits.softmax(-1)[..., :-1],
                          torch.nn.functional.interpolate(out.final.masks, (96, 128), mode="bilinear").sigmoid())
    torch.testing.assert_close(probs, manual)
    # any image size: padded to multiples of 32 inside, cropped back
    pred = model.probabilities(torch.randn(2, 3, 100, 90), RatioPolicy.from_preset("dynamic", "ade20k"))
    assert pred.shape == (2, 7, 100, 90)


def mean_iou(pred, labels, classes):
    ious = []
    for c in range(classes):
        union = ((pred == c) | (labels == c)).sum()
        if union:
            ious.append(((pred == c) & (labels == c)).sum() / union)
    return torch.stack(ious).mean().item()


def test_segmentor_overfits_four_scenes():
    """The paper's setting: eq. 2 while training, eq. 1 (per image) at inference."""
    torch.manual_seed(0)
    images, labels = tensor_scenes(4, classes=5)
    model = build_segmentor("dups_demo", num_classes=5)
    crit = SegmentationCriterion(5, CriterionConfig(num_points=2048))
    policy = RatioPolicy.from_preset("dynamic", "ade20k")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    best = 0.0
    for step in range(1, 151):
        out = model(images, policy)
        loss = crit(out.predictions, labels, out.records)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            model.eval()
            best = max(best, mean_iou(model.probabilities(images, policy).argmax(1), labels, 5))
            model.train()
            if best >= 0.9:
                break
    assert best >= 0.9, best


def test_classifier_overfits_eight_images_and_its_backbone_loads():
    torch.manual_seed(0)
    images, labels = tensor_scenes(8, classes=5, seed=3)
    targets = torch.arange(8) % 4
    images = images + targets[:, None, None, None] * 0.5  # the class is in the image
    model = build_classifier("dups_demo", num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(60):
        model.set_progress(step / 60)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.upsampling_ratio == pytest.approx(0.5 + 0.5 / 60)
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(1) == targets).float().mean().item()
    assert acc == 1.0
    seg = build_segmentor("dups_demo", num_classes=5)
    report = load_backbone(seg, model.state_dict())
    assert report.missing == [] and report.unexpected == []
    for name, tensor in seg.encoder.state_dict().items():
        assert torch.equal(tensor, model.encoder.state_dict()[name])
    other = build_classifier("dups_demo", num_classes=4, dims=(128, 64, 32, 64))
    report = load_backbone(seg, other.state_dict())
    assert report.unexpected and "encoder.out_norms.3.weight" in report.unexpected
    assert "out_norms.3.weight" in report.missing
    # A checkpoint written before the heads read the pixel spread: pre-training never runs the
    # heads, so their missing tensors keep the segmentor's own initialisation, and the rest loads.
    older = build_classifier("dups_demo", num_classes=4, score_pixels=False)
    seg = build_segmentor("dups_demo", num_classes=5)
    before = {k: v.clone() for k, v in seg.encoder.state_dict().items()}
    report = load_backbone(seg, older.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert "pixel_spread.embed.weight" in report.fresh and "upsample.0.spread_in.1.weight" in report.fresh
    assert "upsample.0.score.0.weight" not in report.fresh  # present in both: loaded
    for name, tensor in seg.encoder.state_dict().items():
        expected = before[name] if name in report.fresh else older.encoder.state_dict()[name]
        assert torch.equal(tensor, expected), name


@torch.no_grad()
def test_oracle_scores_choose_the_tokens():
    torch.manual_seed(0)
    images, labels = tensor_scenes(2, size=128)
    model = build_segmentor("dups_demo", num_classes=5).train()
    g = torch.Generator().manual_seed(0)
    fractions = edge_scores(labels)
    assert oracle_maps(fractions, 0.0, g) is None
    used = sum(oracle_maps(fractions, 0.3, g) is not None for _ in range(2000))
    assert 500 < used < 700  # about 30% of batches
    maps = oracle_maps(fractions, 1.0, g)
    torch.testing.assert_close(maps[16], edge_scores(labels)[16])
    out = model(images, RatioPolicy.from_preset("batch", "ade20k"), oracle_maps=maps)
    for rec in out.records:
        truth = token_targets(maps[rec.patch], rec.centres, rec.patch)
        k = rec.selected.shape[1]
        chosen = truth.gather(1, rec.selected)
        # the chosen tokens are the k with the largest ground-truth scores
        assert torch.equal(chosen.sort(1).values, truth.topk(k, 1).values.sort(1).values)
        assert rec.scores is not None  # the predictions are still made (and get their loss)
    # the oracle at block 2 only: its tokens by the truth, blocks 1 and 3 by their heads
    out = model(images, RatioPolicy.from_preset("batch", "ade20k"), oracle_maps={16: maps[16]})
    for rec in out.records:
        by = token_targets(maps[16], rec.centres, 16) if rec.patch == 16 else rec.scores.detach()
        k = rec.selected.shape[1]
        assert torch.equal(by.gather(1, rec.selected).sort(1).values, by.topk(k, 1).values.sort(1).values)


def test_centre_embeddings_switch_off_everywhere():
    """The sinusoidal centre embeddings (not in the paper) are one switch per module group."""
    from dups.models.upsampling import CentreEmbedding
    on = build_segmentor("dups_demo", 5, {"centre_embedding": True}, {"centre_embedding": True})
    off = build_segmentor("dups_demo", 5)  # the default
    assert sum(isinstance(m, CentreEmbedding) for m in on.modules()) == 5  # stem, 3 blocks, pixel decoder
    assert not any(isinstance(m, CentreEmbedding) for m in off.modules())
    out = off(torch.randn(1, 3, 64, 96), RatioPolicy("full"))
    assert out.final.masks.shape[-2:] == (16, 24)


@torch.no_grad()
def test_bf16_weights_infer_as_autocast_does():
    """``model.to(torch.bfloat16)`` (no per-forward weight casts) against bf16 autocast over
    fp32 weights: both near the fp32 result, and the bf16 model keeps its dtype throughout.
    The errors are compared under full upsampling: under a selecting policy either bf16 path
    may swap a near-tied token, a discrete change that dwarfs rounding (up to 3.6x the mean
    error on one random model of four)."""
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=8).eval()
    x = torch.randn(2, 3, 96, 128)
    full, policy = RatioPolicy("full"), RatioPolicy.from_preset("fixed", "ade20k")
    ref, ref_full = model.probabilities(x, policy), model.probabilities(x, full)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_full = model.probabilities(x, full).float()
    model = model.to(torch.bfloat16)
    bf16 = model.probabilities(x.to(torch.bfloat16), policy)
    assert bf16.dtype == torch.bfloat16
    bf16 = bf16.float()
    auto_err = (auto_full - ref_full).abs().mean()
    bf16_err = (model.probabilities(x.to(torch.bfloat16), full).float() - ref_full).abs().mean()
    assert 0 < bf16_err < 3 * auto_err  # measured 0.7-2.1x over four random models
    # Same answers wherever fp32's is decided by more than bf16's error (near-ties of the random
    # weights flip under either bf16 path, by how many depends on the CPU's bf16 kernels).
    top2 = ref.topk(2, dim=1).values
    decided = top2[:, 0] - top2[:, 1] > 0.01
    assert decided.float().mean() > 0.5
    assert (bf16.argmax(1) == ref.argmax(1))[decided].float().mean() > 0.99
    labels = inference_model(model, [torch.randint(0, 255, (70, 90, 3), dtype=torch.uint8).numpy()], policy)
    assert labels[0].shape == (70, 90)


@torch.no_grad()
def test_fuse_coarse_changes_only_the_cells_of_unsplit_tokens():
    """``decoder.fuse_coarse``: unsplit coarse tokens' mask features go through the finest
    tokens' fuse layer. With full upsampling every stride-4 cell is a finest token, so the
    switch changes nothing; under a sparse policy it changes exactly the coarse cells."""
    torch.manual_seed(0)
    on = build_segmentor("dups_demo", 5).eval()  # the default
    off = build_segmentor("dups_demo", 5, decoder={"fuse_coarse": False}).eval()
    off.load_state_dict(on.state_dict())  # no new weights: the same model, switched
    x = torch.randn(1, 3, 96, 128)
    full = RatioPolicy("full")
    torch.testing.assert_close(on(x, full).final.masks, off(x, full).final.masks, rtol=0, atol=0)
    sparse = RatioPolicy.from_preset("fixed", "ade20k")
    feats = {}
    for name, model in (("on", on), ("off", off)):
        enc = model.encoder(x, sparse)
        feats[name] = model.pixel_decoder(enc.levels, 96, 128, x).mask_features
    levels = enc.levels[::-1]
    cover = cover_pyramid([lv.centres for lv in levels], [lv.patch for lv in levels], 96, 128)[-1][0]
    coarse = cover < sum(lv.centres.shape[1] for lv in levels[:3])  # cells painted by patch 32/16/8
    assert 0 < coarse.sum() < coarse.numel()
    changed = (feats["on"] - feats["off"]).abs().amax(1)[0].flatten() > 0
    assert torch.equal(changed, coarse)


def test_cell_and_root_heads_score_a_token_with_the_mean_of_its_cells_squares():
    """score_cells = 2 and score_root: a head whose last layer outputs a constant
    (-0.1, 0.2, -0.3, 0.4) per cell scores every token (0.01 + 0.04 + 0.09 + 0.16) / 4."""
    images, _ = tensor_scenes(1, size=128)
    model = build_segmentor("dups_demo", num_classes=5, encoder={"score_cells": 2, "score_root": True}).eval()
    for block in model.encoder.upsample:
        nn.init.zeros_(block.score[-1].weight)
        with torch.no_grad():
            block.score[-1].bias.copy_(torch.tensor([-0.1, 0.2, -0.3, 0.4]))
    with torch.no_grad():
        out = model(images, RatioPolicy("full"))
    for rec in out.records:
        assert rec.root and rec.cells.shape == (*rec.scores.shape, 4)
        torch.testing.assert_close(rec.cells, torch.tensor([0.01, 0.04, 0.09, 0.16]).expand_as(rec.cells))
        torch.testing.assert_close(rec.scores, torch.full_like(rec.scores, 0.075))


def test_pixel_data_adds_each_stride4_cells_own_pixels_to_the_mask_features():
    torch.manual_seed(0)
    images, _ = tensor_scenes(1, size=128)
    model = build_segmentor("dups_demo", num_classes=5).eval()  # pixel_data: the default
    pix = model.pixel_decoder
    with torch.no_grad():
        enc = model.encoder(images, RatioPolicy("per_image"))
        with_pixels = pix(enc.levels, 128, 128, images).mask_features
        embed, pix.pixel_data = pix.pixel_data, None
        without = pix(enc.levels, 128, 128).mask_features
        for y, x in ((0, 0), (5, 17), (31, 31)):
            cell = images[0, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1)  # channels, rows, columns
            torch.testing.assert_close(with_pixels[0, :, y, x] - without[0, :, y, x], embed(cell), atol=1e-5, rtol=1e-5)
    assert with_pixels.shape == (1, 64, 32, 32)
    assert [type(m).__name__ for m in embed] == ["Linear", "GELU", "Linear", "LayerNorm"]  # pixel_data_hidden
    assert embed[0].out_features == 128


def test_pixel_spread_heads_add_each_patchs_cell_spread_to_their_input():
    """score_pixels: every head scores score(score_in(token) + spread_in(s)), s the per-channel
    standard deviation of the cell embeddings over the token's own patch (brute force here)."""
    torch.manual_seed(0)
    images, _ = tensor_scenes(1, size=128)
    images = torch.cat([images, images.flip(-1)])[:, :, :, :96]  # two images, 128 x 96
    model = build_segmentor("dups_demo", num_classes=5)  # score_pixels: the default
    inputs = []
    hooks = [b.score_in.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
             for b in model.encoder.upsample]
    out = model.encoder(images, RatioPolicy("full"))
    for h in hooks:
        h.remove()
    cells = model.encoder.pixel_spread(images).detach()
    for block, rec, cand in zip(model.encoder.upsample, out.records, inputs):
        p, k = rec.patch, rec.patch // 4
        for i, j in ((0, 0), (1, rec.scores.shape[1] - 1), (0, rec.scores.shape[1] // 2)):
            x, y = (int(v) // p for v in rec.centres[i, j])
            patch = cells[i, :, y * k:(y + 1) * k, x * k:(x + 1) * k].flatten(1)
            spread = (patch.var(1, unbiased=False) + 1e-6).sqrt()
            with torch.no_grad():
                expected = block.score(block.score_in(cand[i, j]) + block.spread_in(spread))
            torch.testing.assert_close(rec.scores[i, j].detach(), expected[0], atol=1e-5, rtol=1e-5)
    sum(r.scores.sum() for r in out.records).backward()
    assert model.encoder.pixel_spread.embed.weight.grad.abs().sum() > 0
    paper = build_segmentor("dups_demo", num_classes=5, encoder={"score_pixels": False}).encoder
    assert paper.pixel_spread is None and all(b.spread_in is None for b in paper.upsample)


@torch.no_grad()
def test_eq1_masks_paint_only_the_tokens_eq1_would_keep():
    torch.manual_seed(0)
    model = build_segmentor("dups_demo", num_classes=8).eval()
    for block in model.encoder.upsample:  # heads whose scores straddle the thresholds
        block.score[-1].weight.mul_(200.0)
        block.score[-1].bias.fill_(0.02)
    images = torch.randn(2, 3, 128, 160)
    tau, beta = (0.01, 0.02, 0.04), (0.85, 0.7, 0.6)
    eq2 = RatioPolicy("batch", tau, beta)
    plain = model(images, eq2)
    sparse = model(images, eq2, eq1_masks=True)
    assert sparse.tokens_per_stage == plain.tokens_per_stage  # the encoder runs eq. 2's set
    records = plain.records
    paint = eq1_painters(records, tau)[::-1]  # coarsest first: 32, 16, 8, 4 px
    # Independently, by geometry: a token paints iff its parent (the candidate whose patch
    # holds its centre) paints and scored over tau.
    finest = model.encoder(images, eq2).levels[0].centres
    seen = set()
    for block, r in enumerate(records):
        children = records[block + 1].centres if block + 1 < len(records) else finest
        parent_centres = (children // r.patch) * r.patch + r.patch / 2
        for b in range(images.shape[0]):
            for j, c in enumerate(parent_centres[b]):
                i = int(((r.centres[b] - c).abs().sum(-1) == 0).nonzero())
                expected = bool(paint[block][b, i]) and float(r.scores[b, i]) > tau[block]
                assert bool(paint[block + 1][b, j]) == expected, (block, b, j)
                seen.add(expected)
    assert paint[0].all() and seen == {True, False}
    assert not torch.equal(sparse.final.masks, plain.final.masks)

    # Where eq. 2's set is eq. 1's (one image, eq. 1 itself), painting changes nothing.
    one = images[:1]
    eq1 = RatioPolicy("per_image", tau, beta)
    assert torch.equal(model(one, eq1, eq1_masks=True).final.masks, model(one, eq1).final.masks)
