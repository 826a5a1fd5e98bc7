"""Sparse -> dense: every token copied over its area, plus a learned position embedding.

A dense map at stride s is painted coarsest level first; finer tokens paint over the area of
the coarse token they refine, so every cell ends up with the finest token that covers it.
Each cell then gets an embedding of where it sits inside that token's patch (paper Sec. 3.3).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def cover_index(centres: list[Tensor], patches: list[int], stride: int, height: int,
                width: int) -> Tensor:
    """(B, H/s * W/s) index into the concatenated tokens of ``centres`` (levels of any order)
    of the finest token (patch >= stride) covering each stride-s cell."""
    b = centres[0].shape[0]
    gh, gw = height // stride, width // stride
    canvas = torch.full((b, gh * gw), -1, dtype=torch.long, device=centres[0].device)
    starts = [0]
    for c in centres:
        starts.append(starts[-1] + c.shape[1])
    for lvl in sorted(range(len(patches)), key=lambda i: -patches[i]):
        p = patches[lvl]
        if p < stride or centres[lvl].shape[1] == 0:
            continue
        r = p // stride
        corner = ((centres[lvl] - p / 2) / stride).round().long()  # top-left cell (x, y)
        d = torch.arange(r, device=canvas.device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        rows = corner[..., 1, None] + dy.flatten()  # (B, n, r*r)
        cols = corner[..., 0, None] + dx.flatten()
        cells = (rows * gw + cols).flatten(1)
        ids = torch.arange(starts[lvl], starts[lvl + 1], device=canvas.device)
        canvas.scatter_(1, cells, ids[None, :, None].expand(b, -1, r * r).reshape(b, -1))
    uncovered = (canvas < 0).any()
    message = f"the tokens leave part of the {gh}x{gw} stride-{stride} grid uncovered"
    if canvas.is_cuda:  # checked on the device: no host sync in the forward pass
        torch._assert_async(~uncovered, message)
    elif uncovered:
        raise ValueError(message)
    return canvas


class Densify(nn.Module):
    """Paints token features onto a stride-s grid and adds the in-patch position embedding."""

    def __init__(self, dim: int):
        super().__init__()
        # (dx, dy) of the cell inside its token's patch, in patch units, and log2(patch/stride)
        self.pos = nn.Linear(3, dim)

    def forward(self, features: list[Tensor], centres: list[Tensor], patches: list[int],
                stride: int, height: int, width: int) -> Tensor:
        """-> (B, C, H/s, W/s)"""
        index = cover_index(centres, patches, stride, height, width)
        feats = torch.cat(features, 1)
        all_centres = torch.cat(centres, 1)
        sizes = torch.cat([torch.full(c.shape[:2], float(p), device=c.device)
                           for c, p in zip(centres, patches)], 1)
        b, c = feats.shape[0], feats.shape[-1]
        gh, gw = height // stride, width // stride
        ys = (torch.arange(gh, device=feats.device) + 0.5) * stride
        xs = (torch.arange(gw, device=feats.device) + 0.5) * stride
        cell = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, -1, 2)
        src_centre = all_centres.gather(1, index[..., None].expand(-1, -1, 2))
        src_size = sizes.gather(1, index)
        rel = (cell - src_centre) / src_size[..., None]
        geo = torch.cat([rel, torch.log2(src_size / stride)[..., None]], -1)
        dense = feats.gather(1, index[..., None].expand(-1, -1, c)) + self.pos(geo.to(feats.dtype))
        return dense.transpose(1, 2).reshape(b, c, gh, gw)
