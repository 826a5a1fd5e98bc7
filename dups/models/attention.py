"""Mixed-resolution neighbourhood attention (AutoFocusFormer style) and its backends.

Tokens are ordered along a Hilbert curve by their centres and cut into clusters of
``cluster_size``; every query of a cluster attends to the ``nbhd_size`` tokens nearest to
the cluster's mean centre, whatever their scale (searched among the tokens of the
``CANDIDATE_CLUSTERS`` nearest clusters, so the search is not quadratic in the token count).
Everything positional is computed once per stage (``Neighbourhood``) so that a block issues
only its matmuls, two gathers and one attention call. On a full regular grid (stage 1, dense
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

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dups.models.tokens import raster_cells

BACKENDS = ("auto", "torch", "natten", "xformers", "fused")
# Fourier basis of the position bias: wavelengths in units of the stage's finest patch side,
# in four directions (0, 45, 90, 135 degrees).
BIAS_WAVELENGTHS = (4.0, 16.0, 64.0)
BIAS_DIRECTIONS = 4
_CDIST_CHUNK_ELEMENTS = 1 << 24
# Where a packed batch's padding tokens are searched from (pixels): farther than any real token.
_FAR = 1e6
# Clusters whose tokens are the candidates of a cluster's key search (16 x 8 = 128 for 48 keys).
# On DUPS-Tiny's stage token sets at 512x512 the keys equal the exact nearest 48 (up to ties)
# for 100% of clusters with full upsampling and 96-99.5% with fixed or random ratios; 12
# clusters gave 91-99%. BENCHMARKS.md, section 3.
CANDIDATE_CLUSTERS = 16


@functools.lru_cache(maxsize=64)
def bias_frequencies(unit: float, device=None, dtype=torch.float32) -> Tensor:
    """Angular frequencies (F, 2) of the position-bias basis, in radians per pixel, one row per
    (wavelength, direction). Made on ``device`` directly: a constructor on the CPU feeding a
    CUDA graph breaks inductor's device propagation (torch.compile on a GPU)."""
    rows = [(2 * math.pi / (w * unit)) * f(math.pi * d / BIAS_DIRECTIONS)
            for w in BIAS_WAVELENGTHS for d in range(BIAS_DIRECTIONS) for f in (math.cos, math.sin)]
    return torch.tensor(rows, dtype=torch.float64, device=device).view(-1, 2).to(dtype)


_pad_values_on: frozenset[str] = frozenset({"cpu"})  # device types whose values are read wide


@contextlib.contextmanager
def values_padded_on(*device_types: str):
    """Within it, the torch backend reads values as wide as the queries on these device types
    (by default only the CPU, where that reaches SDPA's fused kernel; ``attend_torch``);
    ``values_padded_on()`` pads nowhere, so FLOP counts see the model's own multiply-adds."""
    global _pad_values_on
    saved, _pad_values_on = _pad_values_on, frozenset(device_types)
    try:
        yield
    finally:
        _pad_values_on = saved


def _at_least_fp32(x: Tensor) -> Tensor:
    """Positions in pixels need fp32 (or better) for their sines, whatever the autocast."""
    return x if x.dtype == torch.float64 else x.float()


def _padded(order: Tensor, slots: int) -> Tensor:
    """(B, N) order -> (B, slots): the last cluster filled up by repeating its last token."""
    return torch.cat([order, order[:, -1:].expand(-1, slots - order.shape[1])], 1)


@dataclass
class Neighbourhood:
    """Who attends to whom, and where everyone is: computed once per stage, shared by its
    blocks, so a block issues no index arithmetic of its own.

    ``key_index`` (B, G, K): the keys of each query group. Grid mode: one group per token
    (G = N, in raster order) and ``grid = (H, W, kernel)``. Cluster mode: ``order`` (B, N)
    sorts tokens along the Hilbert curve and groups are consecutive runs of
    ``cluster_size`` sorted tokens (the last run padded by repeating its last token).
    ``unit`` is the stage's finest patch side in pixels (the position bias's length unit).
    Derived in ``__post_init__``: the tokens' Fourier features ``[cos, sin](w . p)``
    (B, N, 2F) for the position bias and ``[-sin, cos](w . p)`` beside them, and flat row
    indices (batch offsets folded in) for the one-op gathers: ``key_rows`` (B*G*K),
    ``query_rows`` (B*G*M, cluster mode) and ``inverse_group``, ``inverse_slot`` (B*N each,
    cluster mode: the group and the slot in it of every token, in row order).
    ``key_valid`` (B, G, K), only where a packed batch's images may have fewer real tokens
    than a neighbourhood holds: which keys are real (the torch path masks the others).
    Every block of a stage shares one Neighbourhood, so what they all need is made here once.
    """

    key_index: Tensor
    centres: Tensor
    unit: float
    order: Tensor | None = None
    cluster_size: int = 1
    grid: tuple[int, int, int] | None = None
    key_valid: Tensor | None = None
    _key_features: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        b, n = self.centres.shape[:2]
        centres = _at_least_fp32(self.centres)
        # Angles reach hundreds of radians: a bf16 matmul (autocast's choice for @) would
        # turn their sines into noise, so autocast is off here.
        with torch.no_grad(), torch.autocast(centres.device.type, enabled=False):
            theta = centres @ bias_frequencies(self.unit, centres.device, centres.dtype).T
            cos, sin = theta.cos(), theta.sin()
            self.fourier = torch.cat([cos, sin], -1)  # (B, N, 2F)
            self.fourier_turned = torch.cat([-sin, cos], -1)  # the same turned by 90 degrees
            batch = torch.arange(b, device=self.key_index.device)[:, None]
            self.key_rows = (self.key_index + (batch * n)[..., None]).flatten()
            self.query_rows = self.inverse_group = self.inverse_slot = None
            if self.order is not None:
                slots = self.key_index.shape[1] * self.cluster_size
                self.query_rows = (_padded(self.order, slots) + batch * n).flatten()
                inverse = (torch.argsort(self.order, dim=1) + batch * slots).flatten()
                self.inverse_group = inverse // self.cluster_size
                self.inverse_slot = inverse % self.cluster_size

    def key_features(self, dtype: torch.dtype, scale: float) -> Tensor:
        """(B, N, 2F) the keys' bias channels: the Fourier features divided by the attention
        scale (which SDPA multiplies back, so the bias enters unscaled), in ``dtype``; made
        once per stage and dtype, not once per block."""
        if (dtype, scale) not in self._key_features:
            self._key_features[dtype, scale] = (self.fourier / scale).to(dtype)
        return self._key_features[dtype, scale]

    @property
    def groups(self) -> int:
        return self.key_index.shape[1]


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


@functools.lru_cache(maxsize=64)
def _hilbert_table_cached(rows: int, cols: int, unit: float, device: torch.device) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return hilbert_index((xs * unit).floor(), (ys * unit).floor()).flatten().to(device)


@torch.library.custom_op("dups::hilbert_table", mutates_args=())
def _hilbert_table(rows: int, cols: int, unit: float, device: torch.device) -> Tensor:
    """Curve positions of the top-left pixels of a ``rows x cols`` grid of unit cells
    (cached; the tensor is shared, never modify it). An opaque op so that torch.compile
    calls the cache instead of tracing the 16-step curve loop, which inductor would fuse into
    one pointwise expression of exponential size (compiles that never finished)."""
    return _hilbert_table_cached(rows, cols, unit, device)


@_hilbert_table.register_fake
def _(rows: int, cols: int, unit: float, device: torch.device) -> Tensor:
    return torch.empty(rows * cols, dtype=torch.long, device=device)


def hilbert_codes(centres: Tensor, unit: float, image_size: tuple[int, int] | None = None) -> Tensor:
    """(B, N) Hilbert-curve positions of the unit cells holding ``centres`` (B, N, 2): the
    16-bit pixel curve at each cell's top-left pixel, so cells keep the curve's order. With
    ``image_size`` (H, W) the codes of all cells are computed once and looked up (one
    kernel instead of ~300 per stage)."""
    centres = centres.detach()
    if image_size is None:
        corner = ((centres // unit) * unit).floor()
        return hilbert_index(corner[..., 0], corner[..., 1])
    rows, cols = (math.ceil(s / unit) for s in image_size)
    table = _hilbert_table(rows, cols, float(unit), centres.device)
    return table[raster_cells(centres, unit, cols, rows)]


def _nearest(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """(B, Q, k) indices of the ``k`` points (B, P, 2) nearest to each query (B, Q, 2), in
    chunks of queries so the distance matrix stays small. Each distance is computed on its
    own (cdist's matmul form rounds by the matrix's shape) and ties go to the lower index
    (``_lowest``), so the choice is the same on any device and with padding after the points."""
    b, p = points.shape[:2]
    index = torch.arange(p, device=points.device)
    chunk = max(1, _CDIST_CHUNK_ELEMENTS // max(1, b * p))
    return torch.cat([_lowest(torch.cdist(queries[:, i:i + chunk], points,
                                          compute_mode="donot_use_mm_for_euclid_dist"), index, k)
                      for i in range(0, queries.shape[1], chunk)], dim=1)


def _lowest(dist: Tensor, index: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` smallest distances (..., P) (float32, >= 0), ordered by
    (distance, ``index``): one int64 key per entry, the distance's bits above the index (the
    bit patterns of non-negative floats sort as the floats do). topk alone breaks ties as its
    kernel happens to, which differs between devices and with the row's length; on the
    lattices of token centres ties are common (16% of DUPS-Tiny's stage-4 clusters)."""
    key = dist.float().contiguous().view(torch.int32).long()
    return key.bitwise_left_shift_(32).bitwise_or_(index).topk(k, dim=-1, largest=False).indices


def cluster_neighbourhood(centres: Tensor, unit: float, cluster_size: int = 8,
                          nbhd_size: int = 48, image_size: tuple[int, int] | None = None,
                          candidate_clusters: int = CANDIDATE_CLUSTERS,
                          valid: Tensor | None = None, mask_keys: bool = False) -> Neighbourhood:
    """Hilbert-curve clusters and each cluster's ``nbhd_size`` nearest tokens.

    The search is two-level so it stays cheap at 10^5 tokens: each cluster's
    ``candidate_clusters`` nearest clusters (by mean centre; a G x G search, not G x N) supply
    the candidates, and the nearest ``nbhd_size`` of their tokens are the keys. With no more
    clusters than that, every token is a candidate and the search is exact.
    ``image_size`` (H, W), when known, makes the curve a table lookup.
    ``valid`` (B, N), a packed batch's real tokens: padding sorts after every real token and
    is searched as if it lay far away, so each image's real tokens get the clusters and keys
    they get alone. An image with fewer than ``nbhd_size`` real tokens gets padding keys
    too: ``mask_keys`` (``keys_need_mask``) marks them for the attention to skip."""
    b, n, _ = centres.shape
    m = cluster_size
    with torch.no_grad():
        code = hilbert_codes(centres, unit, image_size)
        points = centres.float()
        if valid is not None:
            code = code.masked_fill(~valid, torch.iinfo(code.dtype).max)
            points = torch.where(valid[..., None], points, _FAR)
        # Stable sort: tokens in the same unit cell keep their row order.
        order = torch.sort(code, dim=1, stable=True).indices
        groups = -(-n // m)
        padded_order = _padded(order, groups * m)
        slot_centres = points.gather(1, padded_order[..., None].expand(-1, -1, 2)).view(b, groups, m, 2)
        real = (torch.arange(groups * m, device=centres.device) < n).view(1, groups, m, 1)
        if valid is not None:  # a cluster of padding only keeps its far-away mean
            real = real & valid.gather(1, padded_order).view(b, groups, m, 1)
            real = real | ~real.any(2, keepdim=True)
        cluster_centres = (slot_centres * real).sum(2) / real.sum(2)
        k = min(nbhd_size, n)
        if groups <= candidate_clusters:
            key_index = _nearest(cluster_centres, points, k)
        else:
            near = _nearest(cluster_centres, cluster_centres, candidate_clusters)  # (B, G, C)
            slots = (near[..., None] * m + torch.arange(m, device=centres.device)).flatten(2)
            cand = padded_order.gather(1, slots.flatten(1)).view_as(slots)  # (B, G, C*M) tokens
            dist = (points.gather(1, cand.flatten(1)[..., None].expand(-1, -1, 2)).view(*cand.shape, 2)
                    - cluster_centres[:, :, None]).square().sum(-1)
            dist = dist.masked_fill(slots >= n, float("inf"))  # padding repeats a token
            key_index = cand.gather(2, _lowest(dist, cand, k))
        key_valid = None
        if valid is not None and mask_keys:
            key_valid = valid.gather(1, key_index.flatten(1)).view_as(key_index)
            key_valid |= ~key_valid.any(-1, keepdim=True)  # a cluster of padding only sees its own
    return Neighbourhood(key_index=key_index, centres=centres, unit=unit, order=order,
                         cluster_size=m, key_valid=key_valid)


def keys_need_mask(height: int, width: int, nbhd_size: int) -> bool:
    """Whether a packed batch of ``height x width`` images needs ``mask_keys``: its images may
    have fewer real tokens than a neighbourhood (every stage holds at least the stem's grid)."""
    return (height // 32) * (width // 32) < nbhd_size


@functools.lru_cache(maxsize=64)
def _window_keys(height: int, width: int, kernel: int, device: torch.device) -> Tensor:
    """(H*W, kernel^2) raster indices of natten's window around each cell."""
    def starts(length: int) -> Tensor:
        i = torch.arange(length, device=device)
        return (i - kernel // 2).clamp(0, length - kernel)
    win = torch.arange(kernel, device=device)
    rows = starts(height)[:, None] + win  # (H, k)
    cols = starts(width)[:, None] + win  # (W, k)
    idx = (rows[:, None, :, None] * width + cols[None, :, None, :])  # (H, W, k, k)
    return idx.reshape(height * width, kernel * kernel)


def grid_neighbourhood(centres: Tensor, height: int, width: int, unit: float,
                       kernel: int = 7) -> Neighbourhood:
    """natten's window neighbourhood on a raster-ordered ``height x width`` grid of tokens
    at ``centres`` (B, H*W, 2). The kernel shrinks to the largest odd size that fits."""
    kernel = min(kernel, height, width)
    kernel -= (kernel + 1) % 2
    keys = _window_keys(height, width, kernel, centres.device)
    return Neighbourhood(key_index=keys.expand(centres.shape[0], -1, -1), centres=centres,
                         unit=unit, grid=(height, width, kernel))


def global_neighbourhood(centres: Tensor, unit: float) -> Neighbourhood:
    """Every token attends to every token (B, N, 2): one group of all N, so the backends'
    gathers are plain copies and the attention is one SDPA call over N x N. Stage 1's
    "lightweight ViT" (256 tokens at 512 x 512)."""
    b, n = centres.shape[:2]
    rows = torch.arange(n, device=centres.device)
    return Neighbourhood(key_index=rows.view(1, 1, n).expand(b, -1, -1), centres=centres,
                         unit=unit, order=rows.expand(b, -1), cluster_size=n)


@functools.lru_cache(maxsize=None)
def _xformers_runs() -> bool:
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
def _libnatten_present() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import natten
        return bool(getattr(natten, "HAS_LIBNATTEN", False))
    except Exception:
        return False


# The probes are constants to torch.compile: run once when traced, never traced themselves.
# Traced, their imports broke the graph at every attention call on a GPU (BENCHMARKS.md).
@torch.compiler.assume_constant_result
def xformers_available() -> bool:
    """xformers imports and its memory-efficient kernel actually runs on this GPU."""
    return _xformers_runs()


@torch.compiler.assume_constant_result
def natten_fast_available() -> bool:
    """natten with its compiled CUDA library (without it natten falls back to flex
    attention, which FACTS.md measured 40x slower than gather + SDPA)."""
    return _libnatten_present()


@torch.compiler.assume_constant_result
def fused_kernel_available() -> bool:
    """Triton imports (it ships with CUDA torch): the fused kernel compiles for CUDA devices, and
    runs on a CPU only in Triton's interpreter (``TRITON_INTERPRET=1``, the tests)."""
    return _triton_present()


@functools.lru_cache(maxsize=None)
def _triton_present() -> bool:
    from dups.models.fused_attention import available

    return available()


# The fused kernel holds one group's (queries x keys) scores in a program's registers: sized for
# the clusters (8 queries, 48 keys), not for a global stage's one group of every token.
FUSED_MAX_QUERIES, FUSED_MAX_KEYS = 32, 128


def applies(backend: str, nbhd: Neighbourhood) -> bool:
    """Whether ``backend``'s kernel can run this neighbourhood: natten takes full grids, the
    fused kernel clusters that fit its tile; torch and xformers take every kind."""
    if backend == "natten":
        return nbhd.grid is not None
    if backend == "fused":
        runs_here = nbhd.centres.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        return (runs_here and fused_kernel_available() and nbhd.query_rows is not None
                and nbhd.cluster_size <= FUSED_MAX_QUERIES and nbhd.key_index.shape[-1] <= FUSED_MAX_KEYS)
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, nbhd: Neighbourhood) -> str:
    """The backend that runs ``nbhd``. A named backend is a preference, as a model-wide setting
    must be (one model has global, grid and clustered stages): it runs where its kernel applies,
    and elsewhere the neighbourhood takes what ``auto`` would."""
    check_backend(backend)
    if nbhd.key_valid is not None:  # masked keys (packed small images): the reference path
        return "torch"
    if backend != "auto" and applies(backend, nbhd):
        return backend
    if nbhd.centres.device.type != "cuda":  # the fast kernels are CUDA kernels
        return "torch"
    if nbhd.grid is not None and natten_fast_available():
        return "natten"
    if xformers_available():
        return "xformers"
    return "torch"


def _groups(q: Tensor, kv: Tensor, nbhd: Neighbourhood) -> tuple[Tensor, Tensor]:
    """One gather each: queries (B, G, M, h, dq) and packed values+keys (B, G, K, h, dv+dq)."""
    # index_select of whole rows: 1.2-1.8x faster than advanced indexing on a CPU, where
    # these gathers took 37% of a batch-8 forward (BENCHMARKS.md)
    b, n, h = q.shape[:3]
    if nbhd.query_rows is None:  # grid mode: one query per group, raster order
        qg = q.unsqueeze(2)
    else:
        qg = q.reshape(b * n, -1).index_select(0, nbhd.query_rows)
        qg = qg.view(b, nbhd.groups, -1, h, q.shape[-1])
    kvg = kv.reshape(b * n, -1).index_select(0, nbhd.key_rows)
    return qg, kvg.view(b, nbhd.groups, -1, h, kv.shape[-1])


def _rows_in_order(out: Tensor, nbhd: Neighbourhood, n: int, dv: int) -> Tensor:
    """(B*G, h, M, >= dv) in group order, any strides -> (B, N, h, dv) in row order (padding
    and extra value channels dropped): one gather, no copy to make the groups contiguous first."""
    h, out = out.shape[1], out[..., :dv]
    if nbhd.inverse_group is None:  # grid mode: M = 1, groups are the rows
        return out.reshape(-1, n, h, dv)
    return out[nbhd.inverse_group, :, nbhd.inverse_slot].view(-1, n, h, dv)


def attend_torch(q: Tensor, kv: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """Reference path: gather each group's queries and values+keys, then SDPA.
    ``q`` (B, N, h, dq), ``kv`` (B, N, h, dv + dq) packed as [values | keys] -> (B, N, h, dv).
    On the devices of ``values_padded_on`` (the CPU) SDPA reads the first dq channels as
    values, as wide as the queries, which takes its fused kernel (3x faster there than the
    unfused one that mixed head sizes get); the extra channels are the keys' first ones and
    only make output channels that are dropped, so no zeros are made or gathered. CUDA's
    memory-efficient kernel takes the narrower values as they are (wide ones cost 1.09x on
    the H100)."""
    b, n, h, dq = q.shape
    dv = kv.shape[-1] - dq
    qg, kvg = _groups(q, kv, nbhd)
    g, m = qg.shape[1], qg.shape[2]
    # 4-D (B*G, h, tokens, d): the layout SDPA kernels (and inductor's attention
    # pattern matcher, which fails on 5-D inputs) expect.
    qg, kvg = qg.reshape(b * g, m, h, dq).transpose(1, 2), kvg.flatten(0, 1).transpose(1, 2)
    values = kvg[..., :dq if q.device.type in _pad_values_on else dv]
    mask = None if nbhd.key_valid is None else nbhd.key_valid.view(b * g, 1, 1, -1)
    out = F.scaled_dot_product_attention(qg, kvg[..., dv:], values, attn_mask=mask, scale=scale)
    return _rows_in_order(out, nbhd, n, dv)


def attend_xformers(q: Tensor, kv: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """Same groups as the reference, through xformers' memory-efficient kernel (CUDA), which
    wants one head size: it reads the first dq channels of the packed [values | keys] as
    values (as the CPU path does; the extra output channels are dropped)."""
    import xformers.ops as xops
    b, n, h, dq = q.shape
    dv = kv.shape[-1] - dq
    qg, kvg = _groups(q, kv, nbhd)
    g, m = qg.shape[1], qg.shape[2]
    kvg = kvg.reshape(b * g, -1, h, dv + dq)
    out = xops.memory_efficient_attention(qg.reshape(b * g, m, h, dq), kvg[..., dv:],
                                          kvg[..., :dq], scale=scale)
    return _rows_in_order(out.transpose(1, 2), nbhd, n, dv)


def attend_natten(q: Tensor, kv: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """natten's 2-D neighbourhood attention on the raster grid (grid mode only)."""
    from natten import na2d
    b, n, h, dq = q.shape
    height, width, kernel = nbhd.grid
    dv = kv.shape[-1] - dq
    v, k = kv[..., :dv], kv[..., dv:]
    # natten wants one head size, a power of two: zero channels change no dot product.
    size = 1 << (dq - 1).bit_length()
    q, k, v = (F.pad(t, (0, size - t.shape[-1])).reshape(b, height, width, h, size)
               for t in (q, k, v))
    out = na2d(q, k, v, kernel_size=kernel, scale=scale)
    return out.reshape(b, n, h, size)[..., :dv]


def attend_fused(q: Tensor, kv: Tensor, nbhd: Neighbourhood, scale: float) -> Tensor:
    """The Triton kernel of ``model.fused_attention`` (imported on first use: Triton is optional)."""
    from dups.models.fused_attention import attend_fused as fused

    return fused(q, kv, nbhd, scale)


_ATTEND = {"torch": attend_torch, "xformers": attend_xformers, "natten": attend_natten, "fused": attend_fused}


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
        # the bias's coefficients: [0] of cos(w . d) (a), [1] of sin(w . d) (c), per head
        self.position_bias = nn.Parameter(torch.zeros(2, heads, 1, freqs))
        nn.init.trunc_normal_(self.position_bias, std=0.02)
        self.backend = "auto"

    def forward(self, x: Tensor, nbhd: Neighbourhood) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        scale = self.head_dim ** -0.5
        # The bias as extra channels: q gets a cos(w.pq) - c sin(w.pq) | a sin + c cos,
        # k gets [cos(w.pk) | sin(w.pk)] / scale; their product times SDPA's scale is
        # sum a cos(w.d) + c sin(w.d). Two kernels for q: a * [cos | sin] + c * [-sin | cos],
        # per head, over (B, N, h, 2, F); k's channels are shared by the stage's blocks.
        halves = (b, n, 1, 2, -1)
        a, c = self.position_bias.unbind(0)  # (h, 1, F) each
        q_extra = torch.addcmul(nbhd.fourier.view(halves) * a, nbhd.fourier_turned.view(halves), c)
        q = torch.cat([q, q_extra.flatten(-2).to(q.dtype)], -1)
        u = nbhd.key_features(k.dtype, scale)[:, :, None].expand(-1, -1, self.heads, -1)
        backend = resolve_backend(self.backend, nbhd)
        # Values first: kernels that want values as wide as queries read past them into the
        # keys instead of gathering zero padding (attend_torch).
        out = _ATTEND[backend](q, torch.cat([v, k, u], -1), nbhd, scale)
        return self.proj(out.reshape(b, n, -1))


def set_backend(module: nn.Module, backend: str) -> None:
    """Every neighbourhood attention inside ``module`` prefers ``backend`` (``resolve_backend``
    says where it applies)."""
    check_backend(backend)
    for m in module.modules():
        if isinstance(m, NeighbourhoodAttention):
            m.backend = backend
