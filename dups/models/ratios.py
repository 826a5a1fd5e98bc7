"""Upsampling-ratio policies: how many of the N_s finest tokens each upsampling block splits.

K = floor(N_s * gamma) exactly (ratios are kept as fractions, so 0.85 * 20 is 17, not 16).
Policies (paper Sec. 3.2.2, Table 4, App. A):
  full       every token (gamma = 1)
  fixed      gamma = beta_s
  per_image  eq. 1: gamma_i = mean(u > tau_s), per image; a batch of images runs
             packed: each stage's new rows padded to the batch's largest K (``bucket``: rounded up
             to a multiple of ceil(bucket * N_s), so a compiled forward sees few shapes)
  batch      eq. 2: gamma = min(max(max_i gamma_i, 0.1), beta_s), one K for the batch (training)
  dynamic    eq. 2 while training, eq. 1 at inference (the paper's best setting)
  random     K = floor(N_s * ratio), tokens chosen at random (pre-training; scores unused)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from torch import Tensor

# Table 8: thresholds tau_s on predicted edge-pixel fractions, and worst-case ratios beta_s,
# for the three upsampling blocks (scales 32, 16, 8).
PRESETS: dict[str, dict[str, tuple[float, float, float]]] = {
    "cityscapes": {"tau": (0.005, 0.01, 0.02), "beta": (0.5, 0.7, 0.65)},
    "ade20k": {"tau": (0.01, 0.02, 0.04), "beta": (0.85, 0.7, 0.6)},
    "cocostuff": {"tau": (0.01, 0.02, 0.04), "beta": (0.7, 0.7, 0.6)},
}
POLICIES = ("full", "fixed", "per_image", "batch", "dynamic", "random")
MIN_BATCH_RATIO = Fraction(1, 10)  # eq. 2's lower bound


def preset(name: str) -> dict[str, tuple[float, float, float]]:
    if name not in PRESETS:
        raise ValueError(f"unknown upsampling preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _frac(x: float | Fraction) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(str(x))


def budget(n: int, gamma: float | Fraction) -> int:
    """K = floor(N * gamma), computed exactly (in integers, so ``n`` may be a traced size
    under torch.compile)."""
    g = _frac(gamma)
    return n * g.numerator // g.denominator


def image_ratios(scores: Tensor, tau: float) -> list[Fraction]:
    """eq. 1 per image: the fraction of tokens whose predicted score exceeds tau."""
    n = scores.shape[1]
    return [Fraction(int(c), n) for c in (scores > tau).sum(1).tolist()]


def batch_ratio(scores: Tensor, tau: float, beta: float) -> Fraction:
    """eq. 2: the batch's largest per-image ratio, at least 0.1 and at most beta."""
    return min(max(max(image_ratios(scores, tau)), MIN_BATCH_RATIO), _frac(beta))


@dataclass
class RatioPolicy:
    """Chooses K for upsampling block ``block`` (0, 1, 2 for scales 32, 16, 8)."""

    kind: str = "dynamic"
    tau: tuple[float, float, float] = PRESETS["ade20k"]["tau"]
    beta: tuple[float, float, float] = PRESETS["ade20k"]["beta"]
    random_ratio: float = 0.5
    bucket: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown ratio policy {self.kind!r}; choose one of {POLICIES}")
        if not 0.0 <= self.random_ratio <= 1.0:
            raise ValueError(f"random_ratio must lie in [0, 1], got {self.random_ratio}")
        if not 0.0 <= self.bucket <= 1.0:
            raise ValueError(f"bucket must lie in [0, 1], got {self.bucket}")

    @classmethod
    def from_preset(cls, kind: str, name: str, **kw) -> "RatioPolicy":
        p = preset(name)
        return cls(kind=kind, tau=p["tau"], beta=p["beta"], **kw)

    @property
    def random_selection(self) -> bool:
        return self.kind == "random"

    def uses_scores(self, training: bool) -> bool:
        return self.effective_kind(training) in ("per_image", "batch")

    def effective_kind(self, training: bool) -> str:
        if self.kind == "dynamic":
            return "batch" if training else "per_image"
        return self.kind

    def packs(self, batch: int, training: bool) -> bool:
        """Whether eq. 1 runs as a packed batch (padded rows): several images, or a bucketed K.
        ``dynamic`` trains with eq. 2 (one K per batch, the paper's); ``per_image`` trains
        packed too, each image with its own K as at inference (the score loss skips padding)."""
        return self.effective_kind(training) == "per_image" and (batch > 1 or self.bucket > 0)

    def image_counts(self, block: int, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        """eq. 1's K_i = floor(N_i * gamma_i), which is the number of real candidates scored
        above tau, per image: (B,) on the scores' device (no host read)."""
        above = scores > self.tau[block]
        return (above if valid is None else above & valid).sum(1)

    def padded_budget(self, n: int, counts: Tensor) -> int:
        """Rows for a packed batch's selection: the largest K_i, rounded up to the bucket; the
        one host read of the block."""
        k = int(counts.max()) if counts.numel() else 0
        if self.bucket > 0 and k:
            step = max(1, math.ceil(n * self.bucket))
            k = min(n, -(-k // step) * step)
        return k

    def num_selected(self, block: int, scores: Tensor, training: bool) -> int:
        """K for this block; ``scores`` (B, N_s) are the predicted edge fractions."""
        b, n = scores.shape
        kind = self.effective_kind(training)
        if n == 0:  # nothing was split at the previous scale
            return 0
        if kind == "full":
            return n
        if kind == "fixed":
            return budget(n, self.beta[block])
        if kind == "random":
            return budget(n, self.random_ratio)
        if kind == "batch":
            return budget(n, batch_ratio(scores, self.tau[block], self.beta[block]))
        ratios = image_ratios(scores, self.tau[block])
        counts = {budget(n, g) for g in ratios}
        if len(counts) > 1:
            raise ValueError(
                "per-image ratios (eq. 1) give these images different token counts "
                f"({sorted(counts)}); run them packed (``RatioPolicy.packs``) or one at a time")
        return counts.pop()


def ratio_schedule(progress: float, start: float = 1.0, end: float = 0.5,
                   shape: str = "linear") -> float:
    """Random-upsampling ratio for pre-training at ``progress`` in [0, 1] (App. A: 100% -> 50%)."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        w = p
    elif shape == "cosine":
        w = 0.5 * (1 - math.cos(math.pi * p))
    elif shape == "step":
        w = 0.0 if p < 0.5 else 1.0
    else:
        raise ValueError(f"unknown ratio schedule shape {shape!r}; choose linear, cosine or step")
    return start + (end - start) * w
