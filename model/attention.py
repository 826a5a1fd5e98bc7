"""Mixed-resolution neighbourhood attention (AutoFocusFormer style) and its backends.

Tokens are ordered along a Hilbert curve by their centres and cut into clusters of
``cluster_size``; every query of a cluster attends to the ``nbhd_size`` tokens nearest to
the cluster's mean centre, whatever their scale. On a full regular grid (stage 1, dense
baselines) the neighbourhood is natten's: a ``kernel x kernel`` window around each query,
shifted inwards at the borders.

The learned relative-position bias is a function of the continuous offset between a query
and a key centre, expanded in a fixed Fourier basis with learned per-head coefficients:
``bias_h(d) = sum_j a_hj cos(w_j . d) + b_hj sin(w_j . d)``. Because
``cos(w.(pk - pq))`` factorises into products of per-token terms, the bias is added exactly by
appending 2F channels to queries and keys. So every backend (gather + SDPA, natten,
xformers) computes the same numbers with no bias tensor at all, and tokens at any position
(any scale) get a bias without a lookup table.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "torch", "natten", "xformers")
# Fourier basis of the position bias: wavelengths in units of the stage's finest patch side,
# in four directions (0, 45, 90, 135 degrees).
BIAS_WAVELENGTHS = (4.0, 16.0, 64.0)
BIAS_DIRECTIONS = 4
_CDIST_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Neighbourhood:
    """Who attends to whom, computed once per stage and shared by its blocks.

    ``key_index`` (B, G, K): the keys of each query group. Grid mode: one group per token
    (G = N, in raster order) and ``grid = (H, W, kernel)``. Cluster mode: ``order`` (B, N)
    sorts tokens along the Hilbert curve and groups are consecutive runs of
    ``cluster_size`` sorted tokens (the last run padded by repeating its last token).
    ``unit`` is the stage's finest patch side in pixels (the position bias's length unit).
    """

    key_index: Tensor
    unit: float
    order: Tensor | None = None
    cluster_size: int = 1
    grid: tuple[int, int, int] | None = None


def hilbert_index(x: Tensor, y: Tensor, bits: int = 16) -> Tensor:
    """Position along a Hilbert curve of side 2**bits for integer coordinates (x, y)."""
    n = 1 << bits
    x, y = x.long().clone(), y.long().clone()
    d = torch.zeros_like(x)
    s = n // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        flip = (~ry) & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        x, y = torch.where(~ry, y, x), torch.where(~ry, x, y)
        s //= 2
    return d


def cluster_neighbourhood(centres: Tensor, unit: float, cluster_size: int = 8,
                          nbhd_size: int = 48) -> Neighbourhood:
    """Hilbert-curve clusters and each cluster's ``nbhd_size`` nearest tokens."""
    b, n, _ = centres.shape
    with torch.no_grad():
        code = hilbert_index(centres[..., 0].floor(), centres[..., 1].floor())
        # Stable sort: tokens in the same integer cell keep their row order.
        order = torch.sort(code, dim=1, stable=True).indices
        groups = -(-n // cluster_size)
        sorted_centres = centres.gather(1, order[..., None].expand(-1, -1, 2)).float()
        pad = groups * cluster_size - n
        member = torch.ones(b, n, 1, device=centres.device)
        if pad:
            sorted_centres = torch.cat([sorted_centres, sorted_centres[:, -1:].expand(-1, pad, -1)], 1)
            member = torch.cat([member, member.new_zeros(b, pad, 1)], 1)
        sorted_centres = sorted_centres.view(b, groups, cluster_size, 2)
        member = member.view(b, groups, cluster_size, 1)
        cluster_centres = (sorted_centres * member).sum(2) / member.sum(2)
        k = min(nbhd_size, n)
        chunk = max(1, _CDIST_CHUNK_ELEMENTS // max(1, b * n))
        key_index = torch.cat([
            torch.cdist(cluster_centres[:, i:i + chunk], centres.float())
            .topk(k, dim=-1, largest=False).indices
            for i in range(0, groups, chunk)], dim=1)
    return Neighbourhood(key_index=key_index, unit=unit, order=order, cluster_size=cluster_size)


def grid_neighbourhood(batch: int, height: int, width: int, unit: float, kernel: int = 7,
                       device=None) -> Neighbourhood:
    """natten's window neighbourhood on a raster-ordered ``height x width`` grid.

    The kernel shrinks to the largest odd size that fits the grid."""
    kernel = min(kernel, height, width)
    kernel -= (kernel + 1) % 2
    def starts(length: int) -> Tensor:
        i = torch.arange(length, device=device)
        return (i - kernel // 2).clamp(0, length - kernel)
    win = torch.arange(kernel, device=device)
    rows = starts(height)[:, None] + win  # (H, k)
    cols = starts(width)[:, None] + win  # (W, k)
    idx = (rows[:, None, :, None] * width + cols[None, :, None, :])  # (H, W, k, k)
    key_index = idx.reshape(1, height * width, kernel * kernel).expand(batch, -1, -1)
    return Neighbourhood(key_index=key_index, unit=unit, grid=(height, width, kernel))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) gathered at index (B, ...) along N."""
    b = x.shape[0]
    flat = x.reshape(b * x.shape[1], *x.shape[2:])
    offset = torch.arange(b, device=x.device).view(b, *([1] * (index.dim() - 1))) * x.shape[1]
    return flat[index + offset]


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """xformers imports and its memory-efficient kernel actually runs on this GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops
        q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # no CUDA operator for this torch, or no xformers at all
        return False


@functools.lru_cache(maxsize=None)
def natten_fast_available() -> bool:
    """natten with its compiled CUDA library (without it natten falls back to flex
    attention, which FACTS.md measured 40x slower than gather + SDPA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import natten
        return bool(getattr(natten, "HAS_LIBNATTEN", False))
    except Exception:
        return False


def resolve_backend(backend: str, nbhd: Neighbourhood) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        if backend == "natten" and nbhd.grid is None:
            raise ValueError("the natten backend needs tokens on a full regular grid")
        return backend
    if nbhd.grid is not None and natten_fast_available():
        return "natten"
    if xformers_available():
        return "xformers"
    return "torch"


def _group_queries(q: Tensor, nbhd: Neighbourhood) -> Tensor:
    """(B, N, h, d) -> (B, G, M, h, d): queries in their groups."""
    if nbhd.order is None:  # grid mode: one query per group, raster order
        return q.unsqueeze(2)
    b, n = q.shape[:2]
    qs = _rows(q, nbhd.order)
    pad = nbhd.key_index.shape[1] * nbhd.cluster_size - n
    if pad:
        qs = torch.cat([qs, qs[:, -1:].expand(-1, pad, -1, -1)], 1)
    return qs.view(b, -1, nbhd.cluster_size, *q.shape[2:])


def _ungroup(out: Tensor, nbhd: Neighbourhood, n: int) -> Tensor:
    """(B, G*M, h, d) in group order -> (B, N, h, d) in row order (padding dropped)."""
    if nbhd.order is None:
        return out
    return _rows(out[:, :n], torch.argsort(nbhd.order, dim=1))


def attend_torch(q: Tensor, k: Tensor, v: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """Reference path: gather each group's queries and keys, then SDPA. (B, N, h, d) in/out."""
    b, n, h, _ = q.shape
    qg = _group_queries(q, nbhd)
    kg, vg = _rows(k, nbhd.key_index), _rows(v, nbhd.key_index)  # (B, G, K, h, d)
    out = F.scaled_dot_product_attention(
        qg.transpose(2, 3), kg.transpose(2, 3), vg.transpose(2, 3), scale=scale)
    return _ungroup(out.transpose(2, 3).reshape(b, -1, h, v.shape[-1]), nbhd, n)


def attend_xformers(q: Tensor, k: Tensor, v: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """Same groups as the reference, through xformers' memory-efficient kernel (CUDA)."""
    import xformers.ops as xops
    b, n, h, dq = q.shape
    qg = _group_queries(q, nbhd)
    g, m = qg.shape[1], qg.shape[2]
    kg, vg = _rows(k, nbhd.key_index), _rows(v, nbhd.key_index)
    dv = v.shape[-1]
    if dv != dq:  # the kernel wants one head size: pad values with zeros
        vg = F.pad(vg, (0, dq - dv))
    out = xops.memory_efficient_attention(
        qg.reshape(b * g, m, h, dq), kg.reshape(b * g, -1, h, dq),
        vg.reshape(b * g, -1, h, dq), scale=scale)[..., :dv]
    return _ungroup(out.reshape(b, g * m, h, dv), nbhd, n)


def attend_natten(q: Tensor, k: Tensor, v: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """natten's 2-D neighbourhood attention on the raster grid (grid mode only)."""
    from natten import na2d
    b, n, h, dq = q.shape
    height, width, kernel = nbhd.grid
    dv = v.shape[-1]
    # natten wants one head size, a power of two: zero channels change no dot product.
    size = 1 << (dq - 1).bit_length()
    q, k, v = (F.pad(t, (0, size - t.shape[-1])).reshape(b, height, width, h, size)
               for t in (q, k, v))
    out = na2d(q, k, v, kernel_size=kernel, scale=scale)
    return out.reshape(b, n, h, size)[..., :dv]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Positions in pixels need fp32 (or better) for their sines, whatever the autocast."""
    return x if x.dtype == torch.float64 else x.float()


_ATTEND = {"torch": attend_torch, "xformers": attend_xformers, "natten": attend_natten}


class NeighbourhoodAttention(nn.Module):
    """Multi-head attention of each token over its neighbourhood, with a learned
    relative-position bias in a Fourier basis (see module docstring)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        freqs = len(BIAS_WAVELENGTHS) * BIAS_DIRECTIONS
        self.bias_cos = nn.Parameter(torch.zeros(heads, freqs))
        self.bias_sin = nn.Parameter(torch.zeros(heads, freqs))
        nn.init.trunc_normal_(self.bias_cos, std=0.02)
        nn.init.trunc_normal_(self.bias_sin, std=0.02)
        self.backend = "auto"

    @staticmethod
    def frequencies(unit: float, device=None) -> Tensor:
        """Angular frequencies (F, 2) of the bias basis, in radians per pixel."""
        angles = torch.arange(BIAS_DIRECTIONS, device=device) * (math.pi / BIAS_DIRECTIONS)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        mags = torch.tensor([2 * math.pi / (w * unit) for w in BIAS_WAVELENGTHS], device=device)
        return (mags[:, None, None] * dirs[None]).reshape(-1, 2)

    def position_bias(self, offsets: Tensor, unit: float) -> Tensor:
        """bias (..., heads) for key-minus-query offsets (..., 2) in pixels."""
        offsets = _at_least_fp32(offsets)
        theta = offsets @ self.frequencies(unit, offsets.device).to(offsets.dtype).T  # (..., F)
        return theta.cos() @ self.bias_cos.T + theta.sin() @ self.bias_sin.T

    def _bias_channels(self, centres: Tensor, unit: float, scale: float):
        centres = _at_least_fp32(centres)
        theta = centres @ self.frequencies(unit, centres.device).to(centres.dtype).T  # (B, N, F)
        cos, sin = theta.cos()[:, :, None], theta.sin()[:, :, None]  # (B, N, 1, F)
        a, b = self.bias_cos, self.bias_sin  # (h, F)
        q_extra = torch.cat([a * cos - b * sin, a * sin + b * cos], -1) / scale
        k_extra = torch.cat([cos, sin], -1).expand(-1, -1, self.heads, -1)
        return q_extra, k_extra

    def forward(self, x: Tensor, centres: Tensor, nbhd: Neighbourhood) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        scale = self.head_dim ** -0.5
        q_extra, k_extra = self._bias_channels(centres, nbhd.unit, scale)
        q = torch.cat([q, q_extra.to(q.dtype)], -1)
        k = torch.cat([k, k_extra.to(k.dtype)], -1)
        out = _ATTEND[resolve_backend(self.backend, nbhd)](q, k, v, nbhd, scale)
        return self.proj(out.reshape(b, n, -1))
