"""Attention backends on the same token sets, and what clustering and gathering cost.

    .venv/bin/python benchmarks/attention.py [--tokens 21760] [--grid 32] [--repeats 5] [--bf16]

1. Grid (stage 1 / dense baselines): torch reference vs natten, same numbers checked.
2. Mixed-resolution tokens: torch reference vs xformers and the fused Triton kernel (CUDA
   only), same numbers checked; the fused kernel also forward + backward.
3. Per stage-4-sized set: Hilbert clustering + the two-level nearest-neighbour search (once per
   stage; the exact all-token search beside it) and the gathers, as fractions of one block's time.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import device_name, time_ms
from dups.models.attention import (BIAS_DIRECTIONS, BIAS_WAVELENGTHS, NeighbourhoodAttention,
                             _groups, attend_fused, attend_torch, cluster_neighbourhood, grid_neighbourhood,
                             natten_fast_available, values_padded_on, xformers_available)
from dups.models.encoder import Block
from dups.models.fused_attention import available as fused_available


def timer(device, repeats):
    """Median of ``repeats`` timed calls after one warm-up call."""
    def run(fn) -> float:
        return statistics.median([time_ms(fn, device) for _ in range(repeats + 1)][1:])
    return run


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=21760, help="mixed set size (stage 4, 512x512, full)")
    ap.add_argument("--grid", type=int, default=32, help="grid side for the natten comparison")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    run = timer(device, args.repeats)
    torch.manual_seed(0)
    attn = NeighbourhoodAttention(args.dim, args.dim // 32).to(device, dtype)
    print(f"{device_name(device)}, {dtype}, width {args.dim}, median of {args.repeats}")

    g = args.grid
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    centres = (torch.stack([xs, ys], -1).reshape(1, g * g, 2).float() * 32 + 16).to(device)
    x = torch.randn(1, g * g, args.dim, device=device, dtype=dtype)
    nbhd = grid_neighbourhood(centres, g, g, 32.0, 7)
    attn.backend = "torch"
    ref = attn(x, nbhd)
    t_ref = run(lambda: attn(x, nbhd))
    line = f"1. grid {g}x{g}, 7x7 window: torch {t_ref:.2f} ms"
    try:
        attn.backend = "natten"
        out = attn(x, nbhd)
        err = (out.float() - ref.float()).abs().max().item()
        t_nat = run(lambda: attn(x, nbhd))
        fast = "compiled libnatten" if natten_fast_available() else "flex fallback (no libnatten)"
        line += f", natten {t_nat:.2f} ms ({fast}), natten/torch {t_nat / t_ref:.2f}x, max |diff| {err:.1e}"
    except Exception as e:  # natten missing or no kernel for this device
        line += f", natten unavailable ({type(e).__name__})"
    print(line)

    n = args.tokens
    centres = torch.rand(1, n, 2, device=device) * 512
    x = torch.randn(1, n, args.dim, device=device, dtype=dtype)
    nbhd = cluster_neighbourhood(centres, 4.0, image_size=(512, 512))
    # one block's attention inputs: queries with the bias channels, packed [values | keys]
    heads, dq = args.dim // 32, 32 + 2 * len(BIAS_WAVELENGTHS) * BIAS_DIRECTIONS
    q = torch.randn(1, n, heads, dq, device=device, dtype=dtype)
    kv = torch.randn(1, n, heads, dq + 32, device=device, dtype=dtype)
    attn.backend = "torch"
    ref = attn(x, nbhd)
    t_ref = run(lambda: attn(x, nbhd))
    line = f"2. {n} mixed tokens, clusters of 8, 48 keys: torch {t_ref:.2f} ms"
    # Values read as wide as the queries (past the values into the keys' channels) let SDPA
    # pick a fused kernel that wants one head size: the default on CPU; this measures whether
    # it pays on this device.
    padded, narrow = values_padded_on(device.type), values_padded_on()
    with narrow:
        out_narrow = attn(x, nbhd)
        t_narrow = run(lambda: attn(x, nbhd))
    with padded:  # compared with the narrow values, whichever the device's default is
        err = (attn(x, nbhd).float() - out_narrow.float()).abs().max().item()
        t_padded = run(lambda: attn(x, nbhd))
    line += (f" (values as they are {t_narrow:.2f} ms, read as wide as the queries {t_padded:.2f} ms, "
             f"padded/narrow {t_padded / t_narrow:.2f}x, max |diff| {err:.1e})")
    if xformers_available():
        attn.backend = "xformers"
        err = (attn(x, nbhd).float() - ref.float()).abs().max().item()
        t_x = run(lambda: attn(x, nbhd))
        line += f", xformers {t_x:.2f} ms, xformers/torch {t_x / t_ref:.2f}x, max |diff| {err:.1e}"
    else:
        line += ", xformers: no CUDA kernel here (not measured)"
    if device.type == "cuda" and fused_available():
        attn.backend = "fused"
        err = (attn(x, nbhd).float() - ref.float()).abs().max().item()
        t_f = run(lambda: attn(x, nbhd))
        line += f", fused (Triton) {t_f:.2f} ms, torch/fused {t_ref / t_f:.2f}x, max |diff| {err:.1e}"
        with torch.enable_grad():  # training: forward + backward, the kernel's scatter of key gradients
            xg = x.detach().requires_grad_()
            def step(backend):
                attn.backend = backend
                attn(xg, nbhd).float().sum().backward()
            t_tb, t_fb = run(lambda: step("torch")), run(lambda: step("fused"))
        line += f"; forward + backward torch {t_tb:.2f} ms, fused {t_fb:.2f} ms ({t_tb / t_fb:.2f}x)"
        attn.backend = "torch"
        # the attention alone: gathers + SDPA + output gather against the kernel
        t_core = run(lambda: attend_torch(q, kv, nbhd, dq ** -0.5))
        t_core_f = run(lambda: attend_fused(q, kv, nbhd, dq ** -0.5))
        line += (f"; the attention alone (no projections): gathers + SDPA {t_core:.2f} ms, fused kernel "
                 f"{t_core_f:.2f} ms ({t_core / t_core_f:.2f}x)")
    else:
        line += ", fused (Triton): CUDA only (not measured)"
    print(line)

    block = Block(args.dim, args.dim // 32, 4.0, 0.0).to(device, dtype).eval()
    block.attn.backend = "torch"
    t_block = run(lambda: block(x, nbhd))
    t_cluster = run(lambda: cluster_neighbourhood(centres, 4.0, image_size=(512, 512)))
    t_exact = run(lambda: cluster_neighbourhood(centres, 4.0, image_size=(512, 512),
                                                candidate_clusters=n))
    t_gather = run(lambda: _groups(q, kv, nbhd))
    print(f"3. {n} tokens: one block {t_block:.2f} ms; clustering + two-level kNN {t_cluster:.2f} ms "
          f"(once per stage = {t_cluster / t_block:.2f} blocks; exact search over all tokens "
          f"{t_exact:.2f} ms, {t_exact / t_cluster:.1f}x); q and k/v gathers {t_gather:.2f} ms "
          f"= {t_gather / t_block:.0%} of a block")


if __name__ == "__main__":
    main()
