"""The dynamic upsampling block (paper Sec. 3.2, Fig. 2, App. A).

A 3-layer MLP scores the finest tokens (predicted edge-pixel fraction of their patch); the
top K (K from the ratio policy) are cloned into 2x2 children. Each child gets the block's
learned scale embedding, a learned sub-patch embedding (its place in the 2x2 split), the
embedding of its position, and the image data of its own patch (raw pixels ->
Linear(3 p^2, d) -> 2-layer MLP). The children are appended to the token set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dups.models.edges import token_targets
from dups.models.layers import LearnedTensor, mlp
from dups.models.ratios import RatioPolicy
from dups.models.tokens import TokenSet, child_offsets, raster_cells


class CentreEmbedding(nn.Module):
    """Embedding of token centres: sinusoids of the pixel position (wavelengths 8 px to
    2048 px) through a Linear layer. Sinusoids make offsets between tokens a linear function
    of their embeddings, so the embedding carries relative position."""

    def __init__(self, dim: int, num_freqs: int = 16):
        super().__init__()
        wavelengths = torch.logspace(math.log10(8), math.log10(2048), num_freqs)
        self.register_buffer("omega", 2 * math.pi / wavelengths, persistent=False)
        self.proj = nn.Linear(4 * num_freqs, dim)

    def forward(self, centres: Tensor) -> Tensor:
        theta = centres.float()[..., None] * self.omega  # (..., 2, F)
        feats = torch.cat([theta.sin(), theta.cos()], -1).flatten(-2)
        return self.proj(feats.to(self.proj.weight.dtype))


class PixelSpread(nn.Module):
    """How much a patch's pixels vary, learned: each 4 x 4-pixel cell through
    Linear(48, w) + GELU, then per patch side p the per-channel standard deviation of those
    embeddings over the patch's (p / 4)^2 cells (``model.encoder.score_pixels``)."""

    CELL = 4

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Linear(3 * self.CELL ** 2, width)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, w, H/4, W/4) cell embeddings (a module call, so ZeRO-3 gathers
        the weights)."""
        b, _, h, w = images.shape
        x = nn.functional.gelu(self.embed(image_patches(images, self.CELL).to(self.embed.weight.dtype)))
        return x.transpose(1, 2).reshape(b, -1, h // self.CELL, w // self.CELL)

    @classmethod
    def spread(cls, cells: Tensor, patch: int) -> Tensor:
        """(B, w, H/4, W/4) -> (B, H/p * W/p, w): the standard deviation over each patch's cells."""
        k = patch // cls.CELL
        x = cells.float()
        mean = nn.functional.avg_pool2d(x, k)
        var = (nn.functional.avg_pool2d(x.square(), k) - mean.square()).clamp(min=0)
        return (var + 1e-6).sqrt().flatten(2).transpose(1, 2).to(cells.dtype)


def image_patches(images: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, 3 p^2): the pixels of each patch, raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


@dataclass
class UpsampleRecord:
    """What one block saw and chose, for the score loss and the token pictures."""

    patch: int  # side of the scored (parent) tokens
    centres: Tensor  # (B, N_s, 2) centres of the scored tokens
    scores: Tensor | None  # (B, N_s) predicted edge fractions (None when not computed)
    selected: Tensor  # (B, K) indices into the scored tokens, ascending (a packed batch: real ones first)
    valid: Tensor | None = None  # (B, N_s) real candidates of a packed batch (a prefix of each row)
    chosen: Tensor | None = None  # (B, K) real entries of ``selected`` in a packed batch
    cells: Tensor | None = None  # (B, N_s, m^2) predicted fractions of each token's cells, raster order
    root: bool = False  # the score loss compares square roots of the fractions (``score_root``)

    def of_image(self, sample: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """One image's real candidates: centres (n, 2), scores (n,) or None, and the indices
        of the chosen ones among them (padding of a packed batch dropped)."""
        centres, scores, selected = self.centres[sample], self.scores, self.selected[sample]
        scores = None if scores is None else scores[sample]
        if self.valid is not None:  # real candidates come first, so indices stay as they are
            n = int(self.valid[sample].sum())
            centres, scores = centres[:n], None if scores is None else scores[:n]
        if self.chosen is not None:
            selected = selected[self.chosen[sample]]
        return centres, scores, selected


def eq1_painters(records: list[UpsampleRecord], tau: tuple[float, ...]) -> list[Tensor]:
    """Which tokens eq. 1 would keep, for a forward run with another selection (eq. 2 in
    training): per level, finest first, (B, n) True for a token whose every ancestor scored
    over its block's tau (the first stage's tokens, block 1's candidates, all). A child of a
    parent eq. 1 would not split belongs to a set inference never builds, so its area is the
    parent's."""
    if any(r.scores is None for r in records):
        raise ValueError("eq. 1's choice needs the score heads' predictions (not random selection)")
    paint = [torch.ones_like(records[0].scores, dtype=torch.bool)]
    for r, t in zip(records, tau):
        split = paint[-1] & (r.scores.detach() > t)
        paint.append(split.gather(1, r.selected).repeat_interleave(4, dim=1))
    return paint[::-1]


class UpsamplingBlock(nn.Module):
    """Scores the finest tokens of a set of width ``dim`` and splits the top K of them."""

    def __init__(self, dim: int, parent_patch: int, image_data: bool = True,
                 score_norm: bool = True, score_sigmoid: bool = False, child_norm: bool = True,
                 centre_embedding: bool = False, score_cells: int = 1, score_root: bool = False,
                 spread_width: int = 0):
        """The switches default as ``EncoderConfig``'s do."""
        super().__init__()
        self.parent_patch = parent_patch
        self.child_patch = parent_patch // 2
        self.score_in = nn.LayerNorm(dim) if score_norm else nn.Identity()
        self.score_cells = score_cells
        self.score_root = score_root
        self.score = mlp(dim, dim, score_cells ** 2, layers=3)
        # ``spread_width`` > 0: the head also sees its patch's pixel spread (``PixelSpread``)
        self.spread_in = nn.Sequential(nn.LayerNorm(spread_width), nn.Linear(spread_width, dim)) \
            if spread_width else None
        self.score_sigmoid = score_sigmoid
        self.scale_embed = LearnedTensor(dim)
        self.subpatch_embed = LearnedTensor(4, dim)
        self.pos_embed = CentreEmbedding(dim) if centre_embedding else None
        self.image_data = image_data
        if image_data:
            self.image_proj = nn.Linear(3 * self.child_patch ** 2, dim)
            self.image_mlp = mlp(dim, dim, dim, layers=2)
            self.image_out = nn.LayerNorm(dim) if child_norm else nn.Identity()

    def init_score_output(self, prior: float = 0.05) -> None:
        """A sigmoid head starts at ``prior`` (about the mean edge fraction), not at 0.5:
        otherwise its first thousands of steps only move the bias down."""
        if self.score_sigmoid:
            nn.init.constant_(self.score[-1].bias, math.log(prior / (1 - prior)))

    def forward(self, tokens: TokenSet, images: Tensor, policy: RatioPolicy, block: int,
                oracle_map: Tensor | None = None,
                spread: Tensor | None = None) -> tuple[TokenSet, UpsampleRecord]:
        """``oracle_map``: ground-truth edge fractions (B, H/p, W/p) at this block's parent
        patch side p; when given they choose the tokens instead of the predictions (Table 7)
        and the predictions still get their loss. ``spread``: (B, H/p * W/p, w) pixel spread of
        every patch (``PixelSpread.spread``), for a head built with ``spread_width``."""
        rows = tokens.stage_rows(tokens.num_stages - 1)
        cand = tokens.features[:, rows]
        cand_centres = tokens.centres[:, rows]
        cand_valid = None if tokens.valid is None else tokens.valid[:, rows]
        b, n, d = cand.shape
        scores = cells = None
        if not policy.random_selection:
            head_in = self.score_in(cand)
            if self.spread_in is not None:
                index = raster_cells(cand_centres, self.parent_patch, images.shape[-1] // self.parent_patch,
                                     images.shape[-2] // self.parent_patch)
                head_in = head_in + self.spread_in(spread.gather(1, index[..., None].expand(-1, -1, spread.shape[-1])))
            cells = self.score(head_in)
            cells = cells.sigmoid() if self.score_sigmoid else cells
            cells = cells.square() if self.score_root else cells
            scores = cells.mean(-1)  # a token's edge fraction is the mean of its cells'
            cells = cells if self.score_cells > 1 else None
        choose_by = scores
        if oracle_map is not None:
            choose_by = token_targets(oracle_map, cand_centres, self.parent_patch)
        chosen = None
        if policy.random_selection:
            k = policy.num_selected(block, cand.new_zeros(b, n), self.training)
            selected = torch.rand(b, n, device=cand.device).topk(k, dim=1).indices.sort(dim=1).values
        elif policy.packs(b, self.training):
            selected, chosen = select_packed(choose_by.detach(), cand_valid, policy, block)
            k = selected.shape[1]
        else:
            k = policy.num_selected(block, choose_by.detach(), self.training)
            selected = choose_by.detach().topk(k, dim=1).indices.sort(dim=1).values
        record = UpsampleRecord(self.parent_patch, cand_centres, scores, selected, cand_valid, chosen, cells,
                                self.score_root)
        # K = 0 runs the same code on empty tensors: every parameter still gets a (zero)
        # gradient, so data-parallel ranks with different K reduce the same buckets.
        parents = cand.gather(1, selected[..., None].expand(-1, -1, d))  # (B, K, d)
        parent_centres = cand_centres.gather(1, selected[..., None].expand(-1, -1, 2))
        centres = (parent_centres[:, :, None] + child_offsets(self.parent_patch, cand.device))
        centres = centres.reshape(b, 4 * k, 2)
        feats = parents[:, :, None] + self.subpatch_embed() + self.scale_embed()  # (B, K, 4, d)
        feats = feats.reshape(b, 4 * k, d)
        if self.pos_embed is not None:
            feats = feats + self.pos_embed(centres).to(feats.dtype)
        if self.image_data:
            p = self.child_patch
            pixels = image_patches(images, p)
            index = raster_cells(centres, p, images.shape[-1] // p)
            pixels = pixels.gather(1, index[..., None].expand(-1, -1, pixels.shape[-1]))
            feats = feats + self.image_out(self.image_mlp(self.image_proj(pixels.to(feats.dtype))))
        scale_index = tokens.scales.new_full((b, 4 * k), tokens.num_stages)
        child_valid = None if chosen is None else chosen[:, :, None].expand(-1, -1, 4).reshape(b, 4 * k)
        return tokens.append(feats, centres, scale_index, child_valid), record


def select_packed(scores: Tensor, valid: Tensor | None, policy: RatioPolicy,
                  block: int) -> tuple[Tensor, Tensor]:
    """Eq. 1 for a batch of images with different budgets: each image's K_i top-scored real
    candidates in ascending order (what the image alone would choose), then padding up to the
    batch's shared width. -> indices (B, K), and which of them are real (B, K)."""
    n = scores.shape[1]
    counts = policy.image_counts(block, scores, valid)
    k = policy.padded_budget(n, counts)
    ranked = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    top = ranked.topk(k, dim=1).indices
    real = torch.arange(k, device=scores.device) < counts[:, None]
    key = torch.where(real, top, top + n).sort(dim=1).values  # real choices first, each run ascending
    return key % n, key < n
