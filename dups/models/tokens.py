"""The mixed-resolution token set that every DUPS module speaks.

Upsampled parents are kept (the paper concatenates new tokens with the old ones), so the
token sets of successive stages are nested prefixes: stage i owns rows ``[0:offsets[i]]``
and the tokens that are new at stage i are rows ``[offsets[i-1]:offsets[i]]``. All samples
of a batch hold the same number of rows (batch ratio policies guarantee it). A packed batch of
images with different budgets (eq. 1) pads each stage's new rows to the batch's largest
budget; ``valid`` marks the real rows, and padding rows never reach a real token: they are
no one's keys (or masked ones, in images of under 48 stem tokens) and paint no pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import functools

import torch
from torch import Tensor

# Patch side (pixels) of the tokens created at each stage: the 32x32 stem, then 2x2 splits.
STAGE_PATCH_SIZES = (32, 16, 8, 4)


@dataclass
class TokenSet:
    """Features (B, N, C), centres in pixels (B, N, 2) as (x, y), scale index (B, N) into
    STAGE_PATCH_SIZES, the end row of each stage's prefix (``offsets[-1] == N``) and, in a
    packed batch, ``valid`` (B, N): False on padding rows (None: every row is real)."""

    features: Tensor
    centres: Tensor
    scales: Tensor
    offsets: list[int] = field(default_factory=list)
    valid: Tensor | None = None

    def __post_init__(self) -> None:
        b, n = self.features.shape[:2]
        if self.centres.shape != (b, n, 2) or self.scales.shape != (b, n):
            raise ValueError(
                f"TokenSet: features {tuple(self.features.shape)}, centres "
                f"{tuple(self.centres.shape)} and scales {tuple(self.scales.shape)} disagree")
        if not self.offsets or self.offsets[-1] != n:
            raise ValueError(f"TokenSet: offsets {self.offsets} must end at N={n}")
        if self.valid is not None and self.valid.shape != (b, n):
            raise ValueError(f"TokenSet: valid {tuple(self.valid.shape)} is not (B, N) = {(b, n)}")

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    @property
    def num_stages(self) -> int:
        return len(self.offsets)

    def stage_rows(self, stage: int) -> slice:
        """Rows of the tokens that are new at ``stage`` (0-based): the finest ones there."""
        start = self.offsets[stage - 1] if stage > 0 else 0
        return slice(start, self.offsets[stage])

    def prefix(self, stage: int, features: Tensor | None = None) -> "TokenSet":
        """The token set as it was at ``stage``: rows ``[0:offsets[stage]]``."""
        end = self.offsets[stage]
        feats = self.features[:, :end] if features is None else features
        return TokenSet(feats, self.centres[:, :end], self.scales[:, :end],
                        self.offsets[: stage + 1], None if self.valid is None else self.valid[:, :end])

    def with_features(self, features: Tensor) -> "TokenSet":
        return TokenSet(features, self.centres, self.scales, list(self.offsets), self.valid)

    def append(self, features: Tensor, centres: Tensor, scales: Tensor,
               valid: Tensor | None = None) -> "TokenSet":
        """A new stage: the given tokens (``valid``: which are real) after the existing ones."""
        if valid is None and self.valid is None:
            both = None
        else:
            both = torch.cat([all_valid(self.features) if self.valid is None else self.valid,
                              all_valid(features) if valid is None else valid], dim=1)
        return TokenSet(
            torch.cat([self.features, features], dim=1),
            torch.cat([self.centres, centres], dim=1),
            torch.cat([self.scales, scales], dim=1),
            self.offsets + [self.num_tokens + features.shape[1]],
            both,
        )


def real_counts(offsets: list[int], valid: Tensor | None) -> list[int | float]:
    """Real tokens at each stage (the prefix sizes ``offsets``), averaged over the batch when
    ``valid`` marks a packed batch's padding: host reads, so made when asked, not in a forward."""
    if valid is None:
        return list(offsets)
    means = [float(valid[:, :end].sum(1).float().mean()) for end in offsets]
    return [int(m) if m.is_integer() else m for m in means]


def all_valid(features: Tensor) -> Tensor:
    """(B, N) True: the validity of rows (B, N, ...) that are all real."""
    return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)


def grid_centres(height: int, width: int, patch: int, device=None) -> Tensor:
    """Centres (x, y) in pixels of a raster-ordered grid of ``patch``-sized patches."""
    ys = torch.arange(height // patch, device=device, dtype=torch.float32) * patch + patch / 2
    xs = torch.arange(width // patch, device=device, dtype=torch.float32) * patch + patch / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def raster_cells(centres: Tensor, patch: int, columns: int, rows: int | None = None) -> Tensor:
    """(...) raster index of the ``patch``-sized cell holding each centre (..., 2), in a
    grid of ``columns`` cells per row (the inverse of ``grid_centres``). With ``rows``,
    centres past the grid get the nearest cell inside it."""
    cells = (centres // patch).long()
    x, y = cells[..., 0], cells[..., 1]
    if rows is not None:
        x, y = x.clamp(0, columns - 1), y.clamp(0, rows - 1)
    return y * columns + x


@functools.lru_cache(maxsize=32)
def child_offsets(parent_patch: int, device=None) -> Tensor:
    """Offsets (x, y) of the 2x2 children's centres from their parent's centre, in the
    sub-patch order top-left, top-right, bottom-left, bottom-right (a cached constant: no
    host-to-device copy per call)."""
    q = parent_patch / 4
    return torch.tensor([[-q, -q], [q, -q], [-q, q], [q, q]], device=device)
