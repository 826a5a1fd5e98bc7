"""Sparse -> dense: every token copied over its area, plus a learned position embedding.

The levels of a token pyramid are painted coarsest first: each finer level paints over the
cells of the coarse tokens it refines, so every cell ends up with the finest token that
covers it. One pass yields the cover maps at every level's stride (each map is the previous
one upsampled 2x, then overwritten by the new level's tokens, one cell each), so the pixel
decoder computes them once for all its dense maps. Each cell then gets an embedding of where
it sits inside its token's patch (paper Sec. 3.3).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dups.models.tokens import raster_cells


def _check_covered(canvas: Tensor, message: str) -> None:
    uncovered = (canvas < 0).any()
    if canvas.is_cuda or torch.compiler.is_compiling():  # no host sync in the forward pass
        torch._assert_async(~uncovered, message)
    elif uncovered:
        raise ValueError(message)


def cover_pyramid(centres: list[Tensor], patches: list[int], height: int, width: int,
                  valid: list[Tensor | None] | None = None) -> list[Tensor]:
    """Cover maps of a token pyramid, coarsest level first.

    ``centres[i]`` (B, n_i, 2) are the tokens of patch side ``patches[i]``, each level's
    side half the previous one's. Returns, per level i, the (B, H/p_i * W/p_i) index into
    the concatenation of ``centres[: i + 1]`` of the finest token covering each p_i-cell.
    ``valid[i]`` (B, n_i) or None: a packed batch's real tokens; padding paints nothing.
    """
    if any(2 * p != q for q, p in zip(patches, patches[1:])):
        raise ValueError(f"cover_pyramid needs patch sides halving from level to level, got {patches}")
    b = centres[0].shape[0]
    device = centres[0].device
    maps: list[Tensor] = []
    start = 0
    for level, (c, p) in enumerate(zip(centres, patches)):
        gh, gw = height // p, width // p
        if level == 0:
            canvas = torch.full((b, gh * gw), -1, dtype=torch.long, device=device)
        else:  # each coarse cell becomes 2x2 cells
            canvas = (maps[-1].view(b, gh // 2, 1, gw // 2, 1).expand(b, gh // 2, 2, gw // 2, 2)
                      .reshape(b, gh * gw))
        ids = torch.arange(start, start + c.shape[1], device=device).expand(b, -1)
        cells = raster_cells(c, p, gw)
        real = valid[level] if valid is not None else None
        if real is None:
            canvas = canvas.scatter(1, cells, ids)
        else:  # padding writes to one spare cell past the grid, dropped after
            spare = torch.cat([canvas, canvas.new_full((b, 1), -1)], 1)
            canvas = spare.scatter(1, cells.masked_fill(~real, gh * gw), ids)[:, :-1]
        if level == 0:  # finer levels only overwrite: a hole can only start here
            _check_covered(canvas, f"the tokens leave part of the {gh}x{gw} stride-{p} grid uncovered")
        maps.append(canvas)
        start += c.shape[1]
    return maps


class Densify(nn.Module):
    """Paints token features onto a stride-s grid and adds the in-patch position embedding."""

    def __init__(self, dim: int):
        super().__init__()
        # (dx, dy) of the cell inside its token's patch, in patch units, and log2(patch/stride)
        self.pos = nn.Linear(3, dim)

    def forward(self, features: list[Tensor], centres: list[Tensor], patches: list[int],
                index: Tensor, height: int, width: int) -> Tensor:
        """Levels coarsest first; the stride is the finest level's patch side and ``index``
        its cover map from ``cover_pyramid``. -> (B, C, H/s, W/s)"""
        stride = patches[-1]
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
