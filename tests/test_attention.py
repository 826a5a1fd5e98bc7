"""Neighbourhood attention: each path against brute-force dense attention with an explicit
neighbourhood mask that the test computes on its own (plain Python loops)."""
import math

import numpy as np
import pytest
import torch

from dups.models.attention import (NeighbourhoodAttention, bias_frequencies, cluster_neighbourhood,
                             global_neighbourhood, grid_neighbourhood, hilbert_codes, hilbert_index, xformers_available)


def hilbert_xy2d(n: int, x: int, y: int) -> int:
    """The textbook per-point Hilbert index (Wikipedia's xy2d), written out independently."""
    d = 0
    s = n // 2
    while s > 0:
        rx = 1 if x & s else 0
        ry = 1 if y & s else 0
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = n - 1 - x, n - 1 - y
            x, y = y, x
        s //= 2
    return d


def test_hilbert_matches_textbook_and_is_a_bijection():
    xs, ys = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    codes = hilbert_index(xs.flatten(), ys.flatten(), bits=4)
    expected = [hilbert_xy2d(16, int(x), int(y)) for x, y in zip(xs.flatten(), ys.flatten())]
    assert codes.tolist() == expected
    assert sorted(expected) == list(range(256))
    # consecutive codes are 4-neighbours: the curve's locality
    inv = {c: (int(x), int(y)) for c, x, y in zip(expected, xs.flatten(), ys.flatten())}
    assert all(abs(inv[c][0] - inv[c + 1][0]) + abs(inv[c][1] - inv[c + 1][1]) == 1
               for c in range(255))


def cluster_mask(centres: np.ndarray, m: int, k: int, unit: float) -> np.ndarray:
    """(N, N) bool: query i may attend key j. Independent of model.attention: tokens sorted
    by the curve position of their unit cell's top-left pixel, ties in row order."""
    n = len(centres)
    codes = [hilbert_xy2d(1 << 16, int(math.floor(cx / unit) * unit), int(math.floor(cy / unit) * unit))
             for cx, cy in centres]
    order = sorted(range(n), key=lambda i: (codes[i], i))
    mask = np.zeros((n, n), dtype=bool)
    for start in range(0, n, m):
        members = order[start:start + m]
        centre = centres[members].mean(0)
        dist = np.sqrt(((centres - centre) ** 2).sum(1))
        keys = np.argsort(dist, kind="stable")[:k]
        for q in members:
            mask[q, keys] = True
    return mask


def window_mask(h: int, w: int, kernel: int) -> np.ndarray:
    """natten's neighbourhood: a kernel x kernel window shifted inwards at the borders."""
    mask = np.zeros((h * w, h * w), dtype=bool)
    for r in range(h):
        for c in range(w):
            r0 = min(max(r - kernel // 2, 0), h - kernel)
            c0 = min(max(c - kernel // 2, 0), w - kernel)
            for rr in range(r0, r0 + kernel):
                for cc in range(c0, c0 + kernel):
                    mask[r * w + c, rr * w + cc] = True
    return mask


def dense_reference(attn: NeighbourhoodAttention, x, centres, mask, unit):
    """softmax(q k^T / sqrt(d) + bias(pk - pq) + mask) v with the bias evaluated directly."""
    b, n, c = x.shape
    h, d = attn.heads, attn.head_dim
    q, k, v = attn.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, N, N)
    offsets = centres[:, None, :, :] - centres[:, :, None, :]  # key - query
    a, bb = attn.position_bias.detach()[:, :, 0].unbind(0)
    omega = bias_frequencies(unit, dtype=centres.dtype)
    theta = torch.einsum("bqkc,fc->bqkf", offsets, omega)
    bias = torch.einsum("bqkf,hf->bhqk", theta.cos(), a) + torch.einsum("bqkf,hf->bhqk", theta.sin(), bb)
    logits = logits + bias + torch.where(torch.as_tensor(mask), 0.0, -math.inf)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


@pytest.fixture
def attn():
    torch.manual_seed(0)
    module = NeighbourhoodAttention(dim=32, heads=2).double()
    with torch.no_grad():  # a bias large enough to matter in the comparison
        module.position_bias.normal_(0, 1.0)
    return module


def test_cluster_attention_equals_brute_force(attn):
    torch.manual_seed(1)
    n, m, k = 45, 8, 12  # N not a multiple of the cluster size: a short last cluster
    centres = torch.rand(1, n, 2, dtype=torch.float64) * 200
    x = torch.randn(1, n, 32, dtype=torch.float64)
    nbhd = cluster_neighbourhood(centres, unit=8.0, cluster_size=m, nbhd_size=k)
    mask = cluster_mask(centres[0].numpy(), m, k, 8.0)
    got = attn(x, nbhd)
    want = dense_reference(attn, x, centres, mask, 8.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cluster_attention_batches_are_independent(attn):
    torch.manual_seed(2)
    centres = torch.rand(2, 30, 2, dtype=torch.float64) * 100
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    nbhd = cluster_neighbourhood(centres, unit=4.0, cluster_size=4, nbhd_size=10)
    got = attn(x, nbhd)
    for i in range(2):
        mask = cluster_mask(centres[i].numpy(), 4, 10, 4.0)
        want = dense_reference(attn, x[i:i + 1], centres[i:i + 1], mask, 4.0)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


def grid_inputs(h, w, patch=32, dtype=torch.float64):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(1, h * w, 2).to(dtype) * patch + patch / 2
    x = torch.randn(1, h * w, 32, dtype=dtype)
    return x, centres


def test_grid_attention_equals_brute_force(attn):
    torch.manual_seed(3)
    h, w, kernel = 6, 9, 5
    x, centres = grid_inputs(h, w)
    nbhd = grid_neighbourhood(centres, h, w, unit=32.0, kernel=kernel)
    got = attn(x, nbhd)
    want = dense_reference(attn, x, centres, window_mask(h, w, kernel), 32.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_global_attention_equals_brute_force(attn):
    """Stage 1's global attention: every token over all tokens of a non-square grid, each
    image of the batch on its own."""
    torch.manual_seed(6)
    h, w = 5, 8
    x, centres = grid_inputs(h, w)
    x, centres = torch.cat([x, torch.randn_like(x)]), centres.expand(2, -1, -1)
    got = attn(x, global_neighbourhood(centres, 32.0))
    every = np.ones((h * w, h * w), dtype=bool)
    for i in range(2):
        want = dense_reference(attn, x[i:i + 1], centres[i:i + 1], every, 32.0)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


@torch.no_grad()  # natten's CPU path (flex attention) has no backward
def test_natten_equals_reference_on_a_grid(attn):
    pytest.importorskip("natten")
    torch.manual_seed(4)
    module = attn.float()
    x, centres = grid_inputs(6, 7, dtype=torch.float32)
    nbhd = grid_neighbourhood(centres, 6, 7, unit=32.0, kernel=5)
    module.backend = "torch"
    want = module(x, nbhd)
    module.backend = "natten"
    got = module(x, nbhd)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not xformers_available(), reason="xformers with CUDA kernels not available")
def test_xformers_equals_reference_on_gpu(attn):
    torch.manual_seed(5)
    module = attn.float().cuda()
    centres = torch.rand(2, 300, 2, device="cuda") * 500
    x = torch.randn(2, 300, 32, device="cuda")
    nbhd = cluster_neighbourhood(centres, unit=8.0)
    module.backend = "torch"
    want = module(x, nbhd)
    module.backend = "xformers"
    got = module(x, nbhd)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_xformers_plumbing_equals_reference(attn, monkeypatch):
    """The xformers path's own work (wide values, BMHK layouts, row order) checked on the
    CPU, where xformers has no kernel: its kernel is replaced by exact attention in
    xformers' layout, (batch, tokens, heads, head size) with one head size for all three."""
    xops = pytest.importorskip("xformers.ops")

    def exact_bmhk(q, k, v, scale):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]  # what the real kernel requires
        out = torch.softmax(torch.einsum("bmhd,bkhd->bhmk", q, k) * scale, -1)
        return torch.einsum("bhmk,bkhd->bmhd", out, v)
    monkeypatch.setattr(xops, "memory_efficient_attention", exact_bmhk)
    torch.manual_seed(5)
    centres = torch.rand(2, 300, 2, dtype=torch.float64) * 500
    x = torch.randn(2, 300, 32, dtype=torch.float64)
    nbhd = cluster_neighbourhood(centres, unit=8.0)
    attn.backend = "torch"
    want = attn(x, nbhd)
    attn.backend = "xformers"
    torch.testing.assert_close(attn(x, nbhd), want, rtol=1e-9, atol=1e-9)


def test_cpu_attention_takes_the_fused_kernel_and_gathers_no_padding(attn):
    """On a CPU, SDPA's fused kernel needs values as wide as the queries (else a 3x slower
    unfused path): they are read from the packed [values | keys] rows, so the gather moves
    only real channels (head 16 + 24 bias channels for the keys, 16 for the values)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            calls.append((func.__name__, tuple(out.shape) if torch.is_tensor(out) else None))
            return out
    module = attn.float()
    centres = torch.rand(1, 200, 2) * 300
    x = torch.randn(1, 200, 32)
    nbhd = cluster_neighbourhood(centres, unit=8.0)
    with torch.no_grad(), Record():
        module(x, nbhd)
    names = [name for name, _ in calls]
    assert names.count("_scaled_dot_product_flash_attention_for_cpu.default") == 1
    gathered = [shape for name, shape in calls if name.startswith("index_select")]
    heads, dq = 2, 16 + 24
    assert gathered == [(nbhd.query_rows.numel(), heads * dq), (nbhd.key_rows.numel(), heads * (16 + dq))]
    assert not any(name.startswith(("zeros", "new_zeros", "constant_pad")) for name in names)


def test_wide_values_overlapping_the_keys_give_the_same_gradients(attn):
    """The CPU path's values are read past into the keys' channels: the output channels they
    make are dropped, so every gradient equals the narrow path's (the keys get theirs once)."""
    from dups.models.attention import values_padded_on
    module = attn.float()
    centres = torch.rand(2, 300, 2) * 400
    x = torch.randn(2, 300, 32, requires_grad=True)
    nbhd = cluster_neighbourhood(centres, unit=8.0)
    weights = torch.randn(2, 300, 32)

    def gradients():
        module.zero_grad()
        x.grad = None
        (module(x, nbhd) * weights).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    wide = gradients()
    with values_padded_on():  # narrow values: SDPA's unfused kernel
        narrow = gradients()
    for got, want in zip(wide, narrow):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bias_parameters_learn(attn):
    torch.manual_seed(6)
    x, centres = grid_inputs(4, 4)
    nbhd = grid_neighbourhood(centres, 4, 4, unit=32.0, kernel=3)
    attn(x, nbhd).square().sum().backward()
    assert (attn.position_bias.grad.flatten(1).abs().sum(1) > 0).all()  # cos and sin


def test_unknown_backend_is_a_clear_error(attn):
    from dups.models.config import encoder_config
    from dups.models.attention import resolve_backend

    x, centres = grid_inputs(4, 4)
    attn.backend = "flash9000"
    with pytest.raises(ValueError, match="unknown attention backend 'flash9000'"):
        attn(x, grid_neighbourhood(centres, 4, 4, 32.0, 3))
    with pytest.raises(ValueError, match="unknown attention backend 'flash9000'"):
        encoder_config("dups_demo", attention_backend="flash9000")
    # natten is a preference for grids: a cluster takes what auto takes (here the reference)
    assert resolve_backend("natten", cluster_neighbourhood(centres, 32.0, 4, 8)) == "torch"


def test_hilbert_table_lookup_equals_direct_codes():
    """The cached per-cell table (used when the image size is known) gives the same codes
    as evaluating the curve per token, for tokens of several patch sides."""
    torch.manual_seed(7)
    for unit in (4.0, 8.0, 32.0):
        sides = torch.tensor([unit, 2 * unit, 4 * unit])[torch.randint(0, 3, (2, 500))]
        cells = torch.randint(0, 24, (2, 500, 2)).float()
        centres = (cells * sides[..., None] + sides[..., None] / 2).clamp(max=384 - 1)
        direct = hilbert_codes(centres, unit)
        looked_up = hilbert_codes(centres, unit, image_size=(384, 416))
        assert torch.equal(direct, looked_up)
    # centres on or past the image's edge take the nearest cell of the table
    edge = torch.tensor([[[415.9, 10.0], [430.0, 10.0], [10.0, 400.0], [-3.0, -3.0]]])
    inside = torch.tensor([[[415.0, 10.0], [415.0, 10.0], [10.0, 383.0], [0.0, 0.0]]])
    assert torch.equal(hilbert_codes(edge, 8.0, image_size=(384, 416)), hilbert_codes(inside, 8.0))


def test_position_features_keep_fp32_under_autocast():
    """Bias angles reach hundreds of radians at 512 px: under bf16 autocast they must still be
    computed in fp32 (a bf16 matmul put errors of 1.4 into their sines and cosines)."""
    torch.manual_seed(3)
    centres = torch.rand(1, 2000, 2) * 512
    want = cluster_neighbourhood(centres, 4.0, image_size=(512, 512))
    with torch.autocast("cpu", torch.bfloat16):
        got = cluster_neighbourhood(centres, 4.0, image_size=(512, 512))
    assert got.fourier.dtype == torch.float32
    torch.testing.assert_close(got.fourier, want.fourier, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.fourier_turned, want.fourier_turned, rtol=0, atol=1e-6)


def test_two_level_search_finds_the_nearest_keys():
    """With more clusters than candidate clusters the search is two-level; its keys must be
    (up to ties) the exact nearest ones for nearly every cluster, never far off for any, and
    never repeat a token (the last cluster's padding)."""
    torch.manual_seed(8)
    n, m, k = 3001, 8, 48
    centres = torch.rand(1, n, 2, dtype=torch.float64) * 512
    nbhd = cluster_neighbourhood(centres, unit=4.0, cluster_size=m, nbhd_size=k)
    pts = centres[0].numpy()
    order = nbhd.order[0].numpy()
    same, worst = 0, 0.0
    groups = nbhd.key_index.shape[1]
    assert groups > 16  # the two-level path
    for g in range(groups):
        centre = pts[order[g * m:(g + 1) * m]].mean(0)
        exact = np.sort(np.sqrt(((pts - centre) ** 2).sum(1)))[:k]
        keys = nbhd.key_index[0, g].numpy()
        assert len(set(keys.tolist())) == k
        got = np.sort(np.sqrt(((pts[keys] - centre) ** 2).sum(1)))
        same += bool(np.allclose(got, exact, rtol=0, atol=1e-6))
        worst = max(worst, got[-1] / exact[-1])
    assert same / groups >= 0.95, same / groups  # 0.971 measured; 12 candidate clusters: 0.70
    assert worst < 1.2, worst  # 1.07 measured; 6 candidate clusters: 1.83
