"""The DUPS encoder: an inverted U-Net over a growing mixed-resolution token set (Sec. 3.1).

Ascending (left) path: 32x32 stem -> stage 1 blocks -> [upsampling block -> project the whole
set to the next width -> stage blocks] x 3. Descending (right) path, stages 3, 2, 1: the
newest (finest) tokens go out to the decoder, the others are projected to the stage's width,
added to the left path's output for the same rows, and refined by the right-side blocks.
Output: a sparse 4-level pyramid (patch sides 4, 8, 16, 32) with the tokens' centres.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dups.models.attention import (Neighbourhood, NeighbourhoodAttention, cluster_neighbourhood,
                        global_neighbourhood, grid_neighbourhood, keys_need_mask, set_backend)
from dups.models.config import EncoderConfig, encoder_config
from dups.models.ratios import RatioPolicy
from dups.models.tokens import STAGE_PATCH_SIZES, TokenSet, grid_centres, real_counts
from dups.models.layers import DropPath, mlp
from dups.models.upsampling import CentreEmbedding, PixelSpread, UpsampleRecord, UpsamplingBlock


class Block(nn.Module):
    """Pre-norm transformer block with neighbourhood attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighbourhoodAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, int(dim * mlp_ratio), dim, layers=2)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, nbhd: Neighbourhood) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), nbhd))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.ModuleList):
    def forward(self, x: Tensor, nbhd: Neighbourhood) -> Tensor:
        for block in self:
            x = block(x, nbhd)
        return x


def projection(dim_in: int, dim_out: int) -> nn.Sequential:
    """Width change at a stage boundary: LayerNorm + Linear over the whole token set."""
    return nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, dim_out))


@dataclass
class Level:
    """One pyramid level: the tokens of one patch side."""

    patch: int
    features: Tensor  # (B, n, C)
    centres: Tensor  # (B, n, 2)
    valid: Tensor | None = None  # (B, n) real tokens of a packed batch (None: all)


@dataclass
class EncoderOutput:
    levels: list[Level]  # patch sides 4, 8, 16, 32 (finest first)
    tokens: TokenSet  # the final stage's whole token set (left path, before descent)
    records: list[UpsampleRecord]  # one per upsampling block

    @property
    def tokens_per_stage(self) -> list[int | float]:
        return real_counts(self.tokens.offsets, self.tokens.valid)


class DUPSEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dims
        # Stochastic depth grows linearly in the order blocks run: the left stages 1..4,
        # then the right stages 3, 2, 1.
        run_order = [("left", i) for i in range(4)] + ([("right", i) for i in (2, 1, 0)] if cfg.unet else [])
        depth = {("left", i): cfg.depths_left[i] for i in range(4)}
        depth.update({("right", i): cfg.depths_right[i] for i in range(3)})
        rates = iter(torch.linspace(0, cfg.drop_path, max(sum(depth[s] for s in run_order), 1)).tolist())
        stage_rates = {s: [next(rates) for _ in range(depth[s])] for s in run_order}

        def stage(side: str, i: int) -> Stage:
            return Stage(Block(d[i], cfg.heads[i], cfg.mlp_ratio, r) for r in stage_rates[side, i])

        self.stem = nn.Conv2d(3, d[0], kernel_size=32, stride=32)
        self.stem_norm = nn.LayerNorm(d[0])
        self.stem_pos = CentreEmbedding(d[0]) if cfg.centre_embedding else None
        self.left = nn.ModuleList(stage("left", i) for i in range(4))
        self.upsample = nn.ModuleList(
            UpsamplingBlock(d[i], STAGE_PATCH_SIZES[i], cfg.image_data, cfg.score_norm,
                            cfg.score_sigmoid, cfg.child_norm, cfg.centre_embedding, cfg.score_cells,
                            cfg.score_root, d[3] if cfg.score_pixels else 0)
            for i in range(3))
        self.pixel_spread = PixelSpread(d[3]) if cfg.score_pixels else None
        self.widen_up = nn.ModuleList(projection(d[i], d[i + 1]) for i in range(3))
        if cfg.unet:
            self.right = nn.ModuleList(stage("right", i) for i in range(3))
            self.widen_down = nn.ModuleList(projection(d[i + 1], d[i]) for i in range(3))
        self.out_norms = nn.ModuleList(nn.LayerNorm(d[i]) for i in range(4))
        self.ratio_policy = RatioPolicy()
        set_backend(self, cfg.attention_backend)
        self.apply(_init_weights)
        for block in self.upsample:
            block.init_score_output()

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(
                f"image sides must be multiples of 32 (the stem's patch), got {h}x{w}; "
                "pad the image first (pipeline inference pads with the ignore value)")

    def forward(self, images: Tensor, policy: RatioPolicy | None = None,
                oracle_maps: dict[int, Tensor] | None = None) -> EncoderOutput:
        """``oracle_maps``: {patch side: (B, H/p, W/p) ground-truth edge fractions}
        (``model.edges.edge_scores`` of the labels) that choose the tokens instead of the
        predictions (Table 7) at the blocks whose parent side is a key (the others use
        their heads)."""
        self.check_images(images)
        policy = policy or self.ratio_policy
        b, _, h, w = images.shape
        x = self.stem(images).flatten(2).transpose(1, 2)
        centres = grid_centres(h, w, 32, images.device).expand(b, -1, -1)
        x = self.stem_norm(x)
        if self.stem_pos is not None:
            x = x + self.stem_pos(centres).to(x.dtype)
        tokens = TokenSet(x, centres, torch.zeros(b, x.shape[1], dtype=torch.long,
                                                  device=x.device), [x.shape[1]])
        nbhds: list[Neighbourhood] = []
        left_out: list[Tensor] = []
        records: list[UpsampleRecord] = []
        cells = None
        if self.pixel_spread is not None and not policy.random_selection:
            cells = self.pixel_spread(images)
        ascend = (images, policy, oracle_maps, cells, nbhds, left_out, records)
        # Written out, not a loop: torch.compile resumes after eq. 1's host read (one per
        # upsampling block) only where no loop encloses it; in a loop it runs this whole frame eagerly.
        tokens = self._ascend(0, tokens, *ascend)
        tokens = self._ascend(1, tokens, *ascend)
        tokens = self._ascend(2, tokens, *ascend)
        tokens = self._ascend(3, tokens, *ascend)
        levels = [self._level(3, tokens, tokens.features)]
        x = tokens.features
        for i in (2, 1, 0):
            if self.cfg.unet:
                end = tokens.offsets[i]
                x = self.widen_down[i](x[:, :end]) + left_out[i]
                x = self.right[i](x, nbhds[i])
            else:
                x = left_out[i]
            levels.append(self._level(i, tokens, x))
        return EncoderOutput(levels=levels, tokens=tokens, records=records)

    def _ascend(self, i: int, tokens: TokenSet, images: Tensor, policy: RatioPolicy,
                oracle_maps: dict[int, Tensor] | None, cells: Tensor | None, nbhds: list[Neighbourhood],
                left_out: list[Tensor], records: list[UpsampleRecord]) -> TokenSet:
        """Stage ``i + 1`` of the left path (after upsampling block ``i``, for ``i > 0``); appends
        its neighbourhood, output and upsampling record to the lists."""
        h, w = images.shape[-2:]
        if i > 0:
            oracle = oracle_maps.get(STAGE_PATCH_SIZES[i - 1]) if oracle_maps else None
            spread = None if cells is None else self.pixel_spread.spread(cells, STAGE_PATCH_SIZES[i - 1])
            tokens, rec = self.upsample[i - 1](tokens, images, policy, i - 1, oracle, spread)
            records.append(rec)
            tokens = tokens.with_features(self.widen_up[i - 1](tokens.features))
        if i == 0 and self.cfg.stage1_attention == "global":
            nbhd = global_neighbourhood(tokens.centres, 32.0)
        elif i == 0:
            nbhd = grid_neighbourhood(tokens.centres, h // 32, w // 32, 32.0, self.cfg.grid_kernel)
        else:
            nbhd = cluster_neighbourhood(tokens.centres, float(STAGE_PATCH_SIZES[i]), self.cfg.cluster_size,
                                         self.cfg.nbhd_size, (h, w), valid=tokens.valid,
                                         mask_keys=keys_need_mask(h, w, self.cfg.nbhd_size))
        tokens = tokens.with_features(self.left[i](tokens.features, nbhd))
        nbhds.append(nbhd)
        left_out.append(tokens.features)
        return tokens

    def _level(self, stage: int, tokens: TokenSet, x: Tensor) -> Level:
        rows = tokens.stage_rows(stage)
        return Level(STAGE_PATCH_SIZES[stage], self.out_norms[stage](x[:, rows]),
                     tokens.centres[:, rows], None if tokens.valid is None else tokens.valid[:, rows])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_encoder(name: str, **overrides) -> DUPSEncoder:
    """``dups_tiny`` / ``dups_small`` / ``dups_base`` (Table 1) or ``dups_demo``."""
    return DUPSEncoder(encoder_config(name, **overrides))
