"""Point-based pixel decoder (AutoFocusFormer's idea, our layers).

The three coarser levels (patch 8, 16, 32) are projected to one width, tagged with a level
embedding and a centre embedding, concatenated, and refined by transformer layers whose
neighbourhood attention mixes the levels by token position (the sparse counterpart of
Mask2Former's multi-scale deformable attention). The finest level (patch 4) gets an FPN-style
lateral projection plus the refined feature of the token it was split from; an unsplit
coarse token takes the same step as its own parent (``fuse_coarse``), so the mask features of
every stride-4 cell come out of one layer whatever the size of the token that paints it. Then
every level is densified: maps at strides 32/16/8 for the transformer decoder, mask features
at stride 4 (with ``pixel_data``, plus an embedding of each stride-4 cell's own pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dups.models.attention import cluster_neighbourhood, keys_need_mask
from dups.models.encoder import Block, Level, Stage
from dups.models.layers import LearnedTensor
from dups.models.tokens import all_valid, raster_cells
from dups.models.upsampling import CentreEmbedding, image_patches
from dups.models.decoder.densify import Densify, cover_pyramid


@dataclass
class PixelDecoderOutput:
    maps: list[Tensor]  # dense (B, C, H/s, W/s) for s = 32, 16, 8 (the decoder's memory)
    mask_features: Tensor  # (B, mask_dim, H/4, W/4)


def _proj(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.LayerNorm(dim))


def _pixel_embedding(dim: int, hidden: int) -> nn.Sequential:
    """A stride-4 cell's 4 x 4 x 3 pixels -> ``dim``: through one hidden layer of ``hidden``
    (0: linear), then LayerNorm."""
    layers = [nn.Linear(3 * 16, hidden), nn.GELU(), nn.Linear(hidden, dim)] if hidden else [nn.Linear(3 * 16, dim)]
    return nn.Sequential(*layers, nn.LayerNorm(dim))


class PointPixelDecoder(nn.Module):
    def __init__(self, in_dims: tuple[int, int, int, int], dim: int = 256, layers: int = 6,
                 heads: int = 8, mlp_ratio: float = 4.0, mask_dim: int = 256,
                 cluster_size: int = 8, nbhd_size: int = 48, centre_embedding: bool = False,
                 fuse_coarse: bool = True, pixel_data: bool = False, pixel_data_hidden: int = 0):
        """``in_dims``: encoder widths of the levels with patch 4, 8, 16, 32; the defaults are
        ``DecoderConfig``'s."""
        super().__init__()
        self.cluster_size, self.nbhd_size = cluster_size, nbhd_size
        self.input_proj = nn.ModuleList(_proj(in_dims[i], dim) for i in (1, 2, 3))
        self.level_embed = LearnedTensor(3, dim)
        self.pos = CentreEmbedding(dim) if centre_embedding else None
        self.layers = Stage(Block(dim, heads, mlp_ratio, 0.0) for _ in range(layers))
        self.lateral = _proj(in_dims[0], dim)
        self.fuse = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU())
        self.fuse_coarse = fuse_coarse
        self.mask_proj = nn.Linear(dim, mask_dim)
        self.densify_maps = nn.ModuleList(Densify(dim) for _ in range(3))
        self.densify_mask = Densify(mask_dim)
        self.pixel_data = _pixel_embedding(mask_dim, pixel_data_hidden) if pixel_data else None

    def forward(self, levels: list[Level], height: int, width: int,
                images: Tensor | None = None, paint: list[Tensor] | None = None) -> PixelDecoderOutput:
        """``images`` (B, 3, H, W): needed with ``pixel_data``. ``paint``: per level (finest
        first, like ``levels``) the tokens that paint the mask features, (B, n) each; a token
        left out leaves its area to the finest painting token above it (default: all paint)."""
        fine, coarse = levels[0], levels[1:][::-1]  # coarse: patch 32, 16, 8
        embeds = self.level_embed().unbind(0)  # rows for patch 8, 16, 32
        x = torch.cat([proj(lv.features) + emb for proj, lv, emb in
                       zip(self.input_proj[::-1], coarse, embeds[::-1])], 1)
        coarse_centres = [lv.centres for lv in coarse]
        coarse_patches = [lv.patch for lv in coarse]
        centres = torch.cat(coarse_centres, 1)
        if self.pos is not None:
            x = x + self.pos(centres).to(x.dtype)
        valid = None  # a packed batch's real tokens, per level (coarse ones, then fine)
        if any(lv.valid is not None for lv in levels):
            valid = [all_valid(lv.centres) if lv.valid is None else lv.valid for lv in coarse + [fine]]
        nbhd = cluster_neighbourhood(centres, float(coarse_patches[-1]), self.cluster_size,
                                     self.nbhd_size, (height, width),
                                     valid=None if valid is None else torch.cat(valid[:3], 1),
                                     mask_keys=keys_need_mask(height, width, self.nbhd_size))
        x = self.layers(x, nbhd)
        coarse_feats = list(x.split([lv.features.shape[1] for lv in coarse], 1))
        covers = cover_pyramid(coarse_centres + [fine.centres], coarse_patches + [fine.patch],
                               height, width, valid)

        # FPN step for the finest tokens: add the refined feature of the covering token
        # (the stride-8 cover map, at the fine token's cell).
        p = coarse_patches[-1]
        parent = covers[-2].gather(1, raster_cells(fine.centres, p, width // p))
        parent_feat = x.gather(1, parent[..., None].expand(-1, -1, x.shape[-1]))
        fine_feat = self.fuse(self.lateral(fine.features) + parent_feat)

        maps = [dens(coarse_feats[: i + 1], coarse_centres[: i + 1], coarse_patches[: i + 1],
                     covers[i], height, width) for i, dens in enumerate(self.densify_maps)]
        if self.fuse_coarse:  # an unsplit token is its own parent: the finest tokens' FPN step
            coarse_feats = [self.fuse(proj(lv.features) + f)
                            for proj, lv, f in zip(self.input_proj[::-1], coarse, coarse_feats)]
        mask_tokens = [self.mask_proj(f) for f in coarse_feats + [fine_feat]]
        mask_cover = covers[-1]
        if paint is not None:
            painters = paint[1:][::-1] + paint[:1]  # coarse ones, then fine
            if valid is not None:
                painters = [p & v for p, v in zip(painters, valid)]
            mask_cover = cover_pyramid(coarse_centres + [fine.centres], coarse_patches + [fine.patch],
                                       height, width, painters)[-1]
        mask_features = self.densify_mask(mask_tokens, coarse_centres + [fine.centres],
                                          coarse_patches + [fine.patch], mask_cover, height, width)
        if self.pixel_data is not None:
            cells = self.pixel_data(image_patches(images, 4).to(mask_features.dtype))  # (B, H/4 * W/4, C)
            mask_features = mask_features + cells.transpose(1, 2).reshape(mask_features.shape)
        return PixelDecoderOutput(maps=maps, mask_features=mask_features)
