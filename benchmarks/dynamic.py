"""The dynamic ratio with a trained score head, against the same ratio on ground-truth edge
fractions (Table 7's oracle), fixed beta and full upsampling: one checkpoint, its validation
images, every policy evaluated by ``dups.evaluation.evaluate`` (single scale). Prints GFLOPs per image
(multiply-adds, flop_counter / 2, of the network and its semantic inference: MLflow's
val/gflops_mean), the ratio to full, mIoU, per upsampling block the share of candidates split,
and tokens per stage; the paper's ratio is Table 4's (dynamic 44.3 / full 74.7 GFLOPs = 0.593
on ADE20K).

    .venv/bin/python benchmarks/dynamic.py --checkpoint demo_run/runs/ray/demo/<launch>/step<N> \\
        --config demo data.train=demo_run/shards

A head that has not learnt yet splits almost every candidate (ratio near 1); one that has
comes near the oracle's token counts (the demo's 300 iterations: 0.66x full). To compare
training variants on held-out scenes, see ``benchmarks/score_heads.py``.
"""
from __future__ import annotations

import argparse

import torch

from common import device_name
from dups.config import load_config
from dups.evaluation.run import compare_policies
from dups.evaluation.measure import FLOP_CONVENTION


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or .pt file")
    ap.add_argument("--config", default="demo", help="config name or YAML path of the model")
    ap.add_argument("--images", type=int, default=0, help="validation images (0 = all)")
    ap.add_argument("overrides", nargs="*", help="config overrides (data.train=... for the shards)")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    up = cfg.upsampling  # the config's preset, thresholds and bucket
    runs = {  # name: (policy, oracle)
        "full": (up.ratio_policy("full"), False),
        f"fixed beta ({up.preset})": (up.ratio_policy("fixed"), False),
        "dynamic, trained head": (up.ratio_policy("per_image"), False),
        "dynamic, oracle": (up.ratio_policy("per_image"), True),
    }
    results = compare_policies(cfg, args.checkpoint, runs, device, args.images)

    print(f"{cfg.model.name}, checkpoint {args.checkpoint}, {results['full'].images} validation images, "
          f"{device_name(device)}, fp32; [{FLOP_CONVENTION}; mean per image]")
    print(f"{'policy':<26}{'GFLOPs':>9}{'x full':>8}{'mIoU':>7}  {'split per block':<20}tokens per stage")
    full = results["full"].gflops_mean
    for name, res in results.items():
        split = " / ".join(f"{v:.2f}" for v in res.split_ratio)
        tokens = " / ".join(f"{v:.0f}" for v in res.tokens_per_stage)
        print(f"{name:<26}{res.gflops_mean:>9.3f}{res.gflops_mean / full:>8.3f}{res.mIoU:>7.1f}  "
              f"{split:<20}{tokens}")


if __name__ == "__main__":
    main()
