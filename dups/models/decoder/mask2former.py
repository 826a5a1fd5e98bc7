"""Mask2Former's masked-attention transformer decoder (Cheng et al. 2022), on dense maps.

Learned queries; each layer = masked cross-attention to one level (round-robin over strides
32, 16, 8), self-attention, FFN (post-norm, as Mask2Former). The mask of each cross-attention
is the previous prediction thresholded at 0.5. Predictions (class logits with a no-object
class, mask logits at stride 4) come before the first layer and after every layer: the last
is the output, the others feed deep supervision.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dups.models.layers import LearnedTensor, mlp


@functools.lru_cache(maxsize=32)
def sine_positions(height: int, width: int, dim: int, device=None) -> Tensor:
    """Mask2Former's normalised 2-D sine position encoding, (H*W, dim); a constant, so
    computed once per size (the cached tensor must not be modified in place)."""
    half = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps)) * scale
    x = (torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps)) * scale
    t = 10000 ** (2 * (torch.arange(half, device=device) // 2) / half)
    py, px = y[:, None] / t, x[:, None] / t  # (H, half), (W, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1)
    pos = torch.cat([py[:, None].expand(-1, width, -1), px[None].expand(height, -1, -1)], -1)
    return pos.reshape(height * width, dim)


class Attention(nn.Module):
    """Multi-head attention from four Linear modules (as nn.MultiheadAttention computes it,
    but each projection runs its own forward, which ZeRO-3's parameter gathering needs)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None) -> Tensor:
        """``blocked`` (B, Q, L): True where a query may not attend."""
        b, nq, d = query.shape
        split = lambda x: x.view(b, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        mask = None if blocked is None else ~blocked[:, None]
        out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)),
                                             split(self.v(value)), attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, nq, d))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.cross = Attention(dim, heads)
        self.self_attn = Attention(dim, heads)
        self.ffn = mlp(dim, ffn, dim, layers=2)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor, memory_keys: Tensor,
                blocked: Tensor | None) -> Tensor:
        """``memory_keys``: the memory plus its position encoding."""
        q = self.norms[0](q + self.cross(q + q_pos, memory_keys, memory, blocked))
        qp = q + q_pos
        q = self.norms[1](q + self.self_attn(qp, qp, q))
        return self.norms[2](q + self.ffn(q))


@dataclass
class Prediction:
    logits: Tensor  # (B, Q, K+1), the last class is "no object"
    masks: Tensor  # (B, Q, H/4, W/4) mask logits


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, num_classes: int, dim: int = 256, queries: int = 100, layers: int = 9,
                 heads: int = 8, ffn: int = 2048, mask_dim: int = 256, num_levels: int = 3):
        super().__init__()
        self.num_levels = num_levels
        self.query_feat = LearnedTensor(queries, dim, std=1.0)
        self.query_pos = LearnedTensor(queries, dim, std=1.0)
        self.level_embed = LearnedTensor(num_levels, dim, std=1.0)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = mlp(dim, dim, mask_dim, layers=3)

    def _predict(self, q: Tensor, mask_features: Tensor, next_size: tuple[int, int]):
        q = self.norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(q), mask_features)
        # attention mask for the next layer: True = may not attend
        small = F.interpolate(masks, size=next_size, mode="bilinear", align_corners=False)
        blocked = (small.flatten(2) < 0).detach()  # sigmoid(x) < 0.5 <=> x < 0
        # a query that would see nothing sees everything
        blocked = blocked.masked_fill(blocked.all(-1, keepdim=True), False)
        return Prediction(self.class_head(q), masks), blocked

    def forward(self, maps: list[Tensor], mask_features: Tensor) -> list[Prediction]:
        """``maps``: dense memory, coarsest first. Returns every prediction, last = final."""
        b = mask_features.shape[0]
        memory, keys, sizes = [], [], []  # keys: memory + position, once per level
        for i, m in enumerate(maps):
            h, w = m.shape[-2:]
            sizes.append((h, w))
            memory.append(m.flatten(2).transpose(1, 2) + self.level_embed()[i])
            keys.append(memory[-1] + sine_positions(h, w, m.shape[1], m.device).to(m.dtype))
        q = self.query_feat().unsqueeze(0).repeat(b, 1, 1)
        q_pos = self.query_pos().unsqueeze(0).repeat(b, 1, 1)
        pred, blocked = self._predict(q, mask_features, sizes[0])
        preds = [pred]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            q = layer(q, q_pos, memory[lvl], keys[lvl], blocked)
            pred, blocked = self._predict(q, mask_features, sizes[(i + 1) % self.num_levels])
            preds.append(pred)
        return preds
