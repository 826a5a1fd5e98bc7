"""Upsampling-score targets: the fraction of semantic-edge pixels in each patch.

One definition, shared by the model's score loss and the offline data preparation. A pixel
is an edge pixel when a 4-neighbour carries a different class; ignore pixels are never edge
pixels and never make a neighbour one. The score of a patch of side s is its edge-pixel
count / s^2. Maps cover ceil(H/s) x ceil(W/s) patches: pixels beyond the image count as
non-edge (the same as the ignore padding that inference adds).

``radius`` > 0 (``upsampling.edge_radius``; the paper's is 0) widens each edge into a band:
every labelled pixel within that Chebyshev distance of an edge pixel counts too, so a patch
inside a small object (whose boundary is a few pixels away) scores above the thresholds and is
split, while the inside of a large region still scores 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dups.models.tokens import raster_cells

SCORE_SCALES = (32, 16, 8)  # patch sides of the tokens the three upsampling blocks score


def edge_map(label: Tensor, ignore_index: int = 255, radius: int = 0) -> Tensor:
    """Boolean edge map of integer labels (..., H, W), widened by ``radius`` pixels."""
    valid = label != ignore_index
    edge = torch.zeros_like(label, dtype=torch.bool)
    dx = (label[..., :, 1:] != label[..., :, :-1]) & valid[..., :, 1:] & valid[..., :, :-1]
    dy = (label[..., 1:, :] != label[..., :-1, :]) & valid[..., 1:, :] & valid[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    if radius > 0:
        lead, (h, w) = edge.shape[:-2], edge.shape[-2:]
        band = F.max_pool2d(edge.reshape(-1, 1, h, w).float(), 2 * radius + 1, 1, radius)
        edge = (band.reshape(*lead, h, w) > 0) & valid
    return edge


def edge_scores(label: Tensor | np.ndarray, scales=SCORE_SCALES,
                ignore_index: int = 255, radius: int = 0) -> dict[int, Tensor]:
    """{s: (..., ceil(H/s), ceil(W/s)) float32 edge fraction} for integer labels (..., H, W)."""
    if isinstance(label, np.ndarray):
        label = torch.from_numpy(label.astype(np.int64))
    edge = edge_map(label, ignore_index, radius).float()
    lead, (h, w) = edge.shape[:-2], edge.shape[-2:]
    edge = edge.reshape(-1, 1, h, w)
    out = {}
    for s in scales:
        padded = F.pad(edge, (0, -w % s, 0, -h % s))
        counts = F.avg_pool2d(padded, s, divisor_override=1)
        out[s] = (counts / (s * s)).reshape(*lead, *counts.shape[-2:])
    return out


def cell_centres(centres: Tensor, patch: int, cells: int) -> Tensor:
    """Centres (B, n * cells^2, 2) of the cells^2 cells of side patch / cells of each token of
    side ``patch`` at ``centres`` (B, n, 2); each token's cells in raster order."""
    side = patch / cells
    steps = (torch.arange(cells, device=centres.device, dtype=centres.dtype) + 0.5) * side - patch / 2
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack([x.flatten(), y.flatten()], -1)  # (cells^2, 2), (x, y) as centres
    return (centres[:, :, None] + offsets).flatten(1, 2)


def token_targets(score_map: Tensor, centres: Tensor, patch: int) -> Tensor:
    """Targets (B, n) for tokens of side ``patch`` at ``centres`` (B, n, 2) from a score
    map (B, rows, cols) of the same patch side. Tokens beyond the map get 0: an image padded
    to a multiple of 32 (inference) has cells past its label's ceil(H/p) x ceil(W/p) map,
    and padding has no edge pixels."""
    rows, cols = score_map.shape[-2:]
    inside = (centres[..., 0] < cols * patch) & (centres[..., 1] < rows * patch)
    values = score_map.flatten(1).gather(1, raster_cells(centres, patch, cols, rows))
    return torch.where(inside, values, 0.0)
