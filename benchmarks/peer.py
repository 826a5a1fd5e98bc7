"""DUPS-Tiny vs the peer Mask2Former with a Swin-T backbone (transformers, random weights):
parameters, GFLOPs and latency on the same input, measured side by side in one run.

    .venv/bin/python benchmarks/peer.py --image-size 512 --repeats 3 [--batch 1] [--bf16]
        [--compile [default|reduce-overhead|max-autotune] | --cuda-graph] [--models peer fixed full fused]

DUPS runs with fixed-beta (ADE20K) and full upsampling (a dynamic ratio needs a trained score
head; an untrained one splits almost everything). GFLOPs are multiply-adds
(flop_counter total / 2, the papers' convention) of the forward passes; a last line adds the
semantic inference (per-pixel class x mask sum at the image size, the same for both models),
which the papers' fvcore counts of the whole network include (BENCHMARKS.md, 1b). ``--compile`` adds a column for each model
under ``torch.compile`` with static shapes (one compiled graph per policy; "reduce-overhead"
replays it as a CUDA graph, which removes the launch cost that dominates batch 1), with the
seconds its first two calls took, or says why it failed; ``--cuda-graph`` instead replays
each eager forward as one captured CUDA graph (no compiler, seconds to set up). ``--models``
runs a subset (one model per process rules out allocator interplay between them); ``fused`` is
fixed beta with the same weights whose clustered attention runs the Triton kernel
(``dups/models/fused_attention.py``; a CUDA device), its answer checked against ``fixed``'s.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from common import cuda_graphed, device_name, time_ms, with_backend
from dups.models import RatioPolicy
from dups.models.segmentor import build_segmentor, semantic_probabilities
from dups.evaluation.measure import FLOP_CONVENTION, count_gmacs, count_params


MODELS = {"peer": "Mask2Former Swin-T", "fixed": "DUPS-Tiny fixed beta", "full": "DUPS-Tiny full",
          "fused": "DUPS-Tiny fixed, fused"}  # fused: the same weights, the Triton kernel's attention


def swin_t_mask2former(classes: int):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone, num_labels=classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune"],
                    help="also time torch.compile'd models (mode; default: default)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each model's eager forward replayed as one CUDA graph")
    ap.add_argument("--models", nargs="+", default=["peer", "fixed", "full"], choices=list(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    image = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    peer = swin_t_mask2former(150).eval().to(device)
    dups = build_segmentor("dups_tiny", 150).eval().to(device)
    fused = with_backend(dups, "fused") if "fused" in args.models else None
    fixed, full = RatioPolicy.from_preset("fixed", "ade20k"), RatioPolicy("full")

    def calls(peer, dups, fused):
        return {
            MODELS["peer"]: lambda: peer(pixel_values=image),
            MODELS["fixed"]: lambda: dups(image, fixed),
            MODELS["full"]: lambda: dups(image, full),
            MODELS["fused"]: lambda: fused(image, fixed),
        }

    chosen = [MODELS[m] for m in MODELS if m in args.models]
    runs = {name: (model, fn) for (name, fn), model in
            zip(calls(peer, dups, fused).items(), (peer, dups, dups, fused)) if name in chosen}
    compiled = {}
    if args.compile:
        options = {"mode": args.compile, "dynamic": False}
        models = (None if m is None else torch.compile(m, **options) for m in (peer, dups, fused))
        compiled = {name: fn for name, fn in calls(*models).items() if name in chosen}

    if args.cuda_graph:
        if args.compile or device.type != "cuda":
            raise SystemExit("--cuda-graph needs a CUDA device and no --compile")
        compiled = {name: fn for name, fn in calls(peer, dups, fused).items() if name in chosen}
    label = "graphed" if args.cuda_graph else "compiled"

    def timed(fn) -> float:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            return time_ms(fn, device)

    def inference_gmacs(out) -> float:
        """Multiply-adds of the semantic inference on a forward's output: the per-pixel sum
        over queries of class probability x mask at the image size (evaluation's
        ``semantic_probabilities``; transformers' post-processing does the same for the peer)."""
        pred = out.final if hasattr(out, "final") else SimpleNamespace(
            masks=out.masks_queries_logits, logits=out.class_queries_logits)
        return count_gmacs(semantic_probabilities, pred, image.shape[-2:])[0]

    if {"fixed", "fused"} <= set(args.models):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            gap = (runs[MODELS["fused"]][1]().final.masks.float() - runs[MODELS["fixed"]][1]().final.masks.float())
        print(f"fused kernel against the reference backend: mask logits differ by at most {gap.abs().max():.2e}")
    stats = {}
    for name, (model, fn) in runs.items():
        with torch.no_grad():
            # the FLOP counter cannot see inside the Triton kernel: count its reference's operations
            gmacs, out = count_gmacs(fn if name != MODELS["fused"] else (lambda: dups(image, fixed)))
            inference = inference_gmacs(out)
        timed(fn)  # warm-up
        stats[name] = {"params": count_params(model) / 1e6, "gflops": gmacs / args.batch,
                       "inference": inference / args.batch, "ms": [], "compiled": []}
    for name, fn in list(compiled.items()):
        try:
            start = time.perf_counter()
            if args.cuda_graph:
                compiled[name] = cuda_graphed(fn, torch.bfloat16 if args.bf16 else None)
                print(f"captured {name} as a CUDA graph in {time.perf_counter() - start:.1f} s")
            else:
                timed(fn), timed(fn)  # compiles (CUDA graphs record on the second call)
                print(f"compiled {name} ({args.compile}): first two calls "
                      f"{time.perf_counter() - start:.0f} s")
        except Exception as e:  # noqa: BLE001 - report, keep the eager figures
            print(f"{label} run failed for {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del compiled[name]
    for _ in range(args.repeats):
        for name, (_, fn) in runs.items():
            stats[name]["ms"].append(timed(fn))
            if name in compiled:
                stats[name]["compiled"].append(timed(compiled[name]))
    print(f"{args.image_size}x{args.image_size}, batch {args.batch}, {device_name(device)}, "
          f"{'bf16' if args.bf16 else 'fp32'}, median of {args.repeats}; [{FLOP_CONVENTION}; per image]")
    base = stats.get(MODELS["peer"])
    base_ms = statistics.median(base["ms"]) if base else None
    base_c = statistics.median(base["compiled"]) if base and base["compiled"] else None

    def ratio(x, ref):
        return f"{x / ref:>8.3f}" if ref else f"{'-':>8}"
    print(f"{'model':<24}{'params M':>10}{'GFLOPs':>9}{'x peer':>8}{'ms':>10}{'x peer':>8}"
          + (f"{label + ' ms':>13}{'x peer':>8}" if compiled else ""))
    for name, s in stats.items():
        ms = statistics.median(s["ms"])
        line = (f"{name:<24}{s['params']:>10.2f}{s['gflops']:>9.2f}"
                f"{ratio(s['gflops'], base and base['gflops'])}{ms:>10.1f}{ratio(ms, base_ms)}")
        if s["compiled"]:
            cms = statistics.median(s["compiled"])
            line += f"{cms:>13.1f}{ratio(cms, base_c)}"
        print(line)
    print("with the semantic inference (class x mask per pixel; the papers' full-network count, "
          "as evaluation counts): " + ", ".join(f"{name} {s['gflops'] + s['inference']:.2f}"
                                                for name, s in stats.items()) + " GFLOPs")


if __name__ == "__main__":
    main()
