"""Edge-score targets against a brute-force loop over pixels."""
import numpy as np
import torch

from model.edges import edge_scores, token_targets


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
