"""FLOP counts in the papers' convention (multiply-adds), checked against hand counts."""
import torch
import torch.nn.functional as F

from dups.models.attention import BIAS_DIRECTIONS, BIAS_WAVELENGTHS, NeighbourhoodAttention, cluster_neighbourhood
from dups.evaluation.measure import count_gmacs


def test_fused_cpu_attention_is_counted():
    # equal head sizes: SDPA takes its fused CPU kernel, which torch's counter does not know
    q, k, v = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    gmacs, _ = count_gmacs(F.scaled_dot_product_attention, q, k, v)
    assert gmacs * 1e9 == 2 * 3 * 10 * 20 * (16 + 16)


@torch.no_grad()
def test_neighbourhood_attention_counts_the_models_own_arithmetic():
    """Not the zero channels that pad values to the query width on CPU (a speed detail)."""
    torch.manual_seed(0)
    n, dim, heads, m, keys = 64, 32, 2, 8, 12
    attn = NeighbourhoodAttention(dim, heads)
    nbhd = cluster_neighbourhood(torch.rand(1, n, 2) * 100, unit=8.0, cluster_size=m, nbhd_size=keys)
    head, extra = dim // heads, 2 * len(BIAS_WAVELENGTHS) * BIAS_DIRECTIONS
    groups = n // m
    linear = n * dim * 3 * dim + n * dim * dim  # qkv and the output projection
    attention = groups * heads * m * keys * ((head + extra) + head)  # q.k with bias channels, a.v
    gmacs, _ = count_gmacs(attn, torch.randn(1, n, dim), nbhd)
    assert gmacs * 1e9 == linear + attention
