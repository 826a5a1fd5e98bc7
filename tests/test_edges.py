"""Edge-score targets against a brute-force loop over pixels."""
import numpy as np
import torch

from dups.models.edges import edge_map, edge_scores, token_targets


def brute_force_scores(label: np.ndarray, s: int, ignore: int = 255) -> np.ndarray:
    h, w = label.shape
    edge = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            if label[y, x] == ignore:
                continue
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and label[yy, xx] != ignore \
                        and label[yy, xx] != label[y, x]:
                    edge[y, x] = True
    gh, gw = -(-h // s), -(-w // s)
    out = np.zeros((gh, gw))
    for i in range(gh):
        for j in range(gw):
            out[i, j] = edge[i * s:(i + 1) * s, j * s:(j + 1) * s].sum() / (s * s)
    return out


def test_edge_scores_equal_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    for h, w in ((40, 56), (64, 64), (33, 70)):  # sides that are not multiples of 32 too
        # blocky labels (so there are interiors) with noise and ignore pixels
        label = rng.integers(0, 4, size=(h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
        label = label.astype(np.uint8)
        label[rng.random((h, w)) < 0.05] = 255
        label[rng.random((h, w)) < 0.03] = 7
        got = edge_scores(label, scales=(32, 16, 8))
        for s in (32, 16, 8):
            np.testing.assert_allclose(got[s].numpy(), brute_force_scores(label, s), atol=1e-7)


def test_an_edge_band_counts_every_labelled_pixel_near_an_edge():
    """``radius`` r: a labelled pixel is an edge pixel when an edge pixel of the paper's
    definition lies within Chebyshev distance r (checked by brute force); ignore pixels never."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # 48 x 64
    label[rng.random(label.shape) < 0.05] = 255
    thin = edge_map(torch.from_numpy(label.astype(np.int64))).numpy()
    for r in (1, 3):
        want = np.zeros_like(thin)
        for y, x in zip(*np.nonzero(thin)):
            want[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = True
        want &= label != 255
        got = edge_scores(label, scales=(16, 8), radius=r)
        for s in (16, 8):
            np.testing.assert_allclose(
                got[s].numpy(), want.reshape(48 // s, s, 64 // s, s).mean((1, 3)), atol=1e-7)
    inner = np.zeros((64, 64), np.uint8)
    inner[14:50, 14:50] = 1  # the 16-px patch (16:32, 16:32) lies 2 px inside the object's edge
    assert edge_scores(inner, scales=(16,), radius=1)[16][1, 1] == 0
    assert edge_scores(inner, scales=(16,), radius=2)[16][1, 1] == 31 / 256  # its top row and left column


def test_flat_label_has_no_edges_and_a_batch_dimension_is_kept():
    label = torch.full((2, 64, 96), 3)
    out = edge_scores(label)
    assert out[32].shape == (2, 2, 3) and out[8].shape == (2, 8, 12)
    assert all(v.sum() == 0 for v in out.values())


def test_token_targets_pick_the_patch_under_each_centre():
    score_map = torch.arange(12.0).view(1, 3, 4)  # 3 rows x 4 cols of 16-px patches
    centres = torch.tensor([[[8.0, 8.0], [56.0, 40.0], [24.0, 40.0]]])
    assert token_targets(score_map, centres, 16).tolist() == [[0.0, 11.0, 9.0]]


def test_token_targets_beyond_the_map_are_zero():
    """An image padded to a multiple of 32 has tokens past its label's map (ceil(H/p) cells):
    they are padding, with no edge pixels."""
    score_map = torch.arange(1.0, 7.0).view(1, 2, 3)  # a 40 x 48 label's 16-px map (ceil)
    centres = torch.tensor([[[40.0, 24.0], [56.0, 8.0], [8.0, 40.0], [56.0, 56.0]]])  # image padded to 64 x 64
    assert token_targets(score_map, centres, 16).tolist() == [[6.0, 0.0, 0.0, 0.0]]


def test_training_targets_line_up_with_the_tokens_the_model_sees():
    """After the training augmentation (scale jitter, crop, flip, padding of a non-square
    image), every token's target is the edge fraction of the label pixels under its own patch
    (brute force, not ``edge_scores``), and the image pixels under it show the same classes."""
    import io
    from PIL import Image
    from dups.data.images import PIXEL_MEAN, PIXEL_STD
    from dups.models.tokens import grid_centres
    from dups.data import augment

    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.uint8)
    label = np.zeros((90, 150), np.uint8)  # not square, not a multiple of 32
    label[:, 40:] = 1
    label[30:70, 100:130] = 2
    label[75:, 10:60] = 3

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()
    sample = {"img": png(colours[label]), "seg.png": png(label), "__key__": "k"}
    for seed in range(6):  # crops, flips and scales that differ
        out = augment.train_segmentation(sample, 64, np.random.default_rng(seed), (0.6, 1.8),
                                          use_photometric=False)
        lab = out["label"].numpy()
        for s in (32, 16, 8):
            centres = grid_centres(64, 64, s)[None]
            got = token_targets(out["scores"][s][None], centres, s)[0].numpy()
            np.testing.assert_allclose(got, brute_force_scores(lab, s).reshape(-1), atol=1e-7)
        pixels = (out["image"].numpy().transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN)
        inside = lab != 255
        nearest = np.abs(pixels[inside][:, None] - colours[None].astype(np.float32)).sum(-1).argmin(1)
        assert (nearest == lab[inside]).mean() > 0.97  # all but resampled boundary pixels
