"""How selective the score heads become, variant against variant: the demo's model trained
(one process, CPU) on the demo's synthetic scenes under each variant's config overrides, then
evaluated on a held-out set of scenes from the same generator.

Per variant it prints, for the three upsampling blocks (scales 32 / 16 / 8): the ranking AUC
of edge tokens above flat ones and the share of flat tokens predicted under tau_s (both with
full upsampling, every candidate scored; a selective head has both near 1), then mIoU and
GFLOPs under full upsampling, the dynamic ratio (eq. 1 on the head's predictions) and the
oracle's (eq. 1 on the true edge fractions).

    .venv/bin/python benchmarks/score_heads.py --iters 600 [--tau-scales 0.5,0.25] \\
        base= weight10=upsampling.score_weight=10 trained_full=upsampling.policy=full

A variant is NAME=override[,override...] (an empty list: the defaults). Runs and data are
kept under --out; a variant already trained there is only evaluated again.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name  # noqa: E402
from model import RatioPolicy  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def scenes(out: Path, train: int, heldout: int) -> Path:
    """The demo's scenes (128 x 160 +- 32) and ``heldout`` more of the same generator, as shards."""
    from data_prep.job import prepare
    from data_prep.synth import write_ade20k_layout

    shards = out / f"shards-{train}-{heldout}"
    if not (shards / "manifest.json").exists():
        write_ade20k_layout(out / f"src-{train}-{heldout}", train, heldout, size=(128, 160))
        prepare("ade20k", str(out / f"src-{train}-{heldout}"), str(shards), shard_bytes=400_000,
                progress=False, use_ray=False)
    return shards


def train_variant(name: str, overrides: list[str], shards: Path, out: Path, iters: int, seed: int):
    from cluster.launch import train_local
    from pipeline.checkpoints import find_checkpoint

    runs = out / "runs" / f"{name}-{iters}-s{seed}"
    cfg = load_config("demo", [f"data.train={shards}", f"train.output={runs}", f"train.iters={iters}",
                               f"train.eval_every={10 * iters}", f"train.checkpoint_every={iters}",
                               f"train.seed={seed}", "launch.launcher=local", "tracking.uri=none",
                               "train.pictures=0", *overrides])
    try:
        return cfg, find_checkpoint(str(runs), cfg.name).url
    except FileNotFoundError:
        pass
    start = time.perf_counter()
    result = train_local(cfg)
    print(f"  {name}: trained {iters} iterations in {time.perf_counter() - start:.0f} s", flush=True)
    return cfg, result.last_checkpoint


def evaluate_variant(cfg, checkpoint: str, tau_scales: tuple[float, ...] = ()) -> dict:
    """Full, dynamic and oracle runs; ``tau_scales``: also dynamic with tau_s times each."""
    from pipeline.evaluate_cli import compare_policies

    up = cfg.upsampling  # the variant's thresholds
    runs = {"full": (up.ratio_policy("full"), False), "dynamic": (up.ratio_policy("per_image"), False),
            "oracle": (up.ratio_policy("per_image"), True)}
    for scale in tau_scales:
        scaled = dataclasses.replace(up, tau_scale=up.tau_scale * scale)
        runs[f"tau x{scale:g}"] = (scaled.ratio_policy("per_image"), False)
    return compare_policies(cfg, checkpoint, runs, torch.device("cpu"))


def probe_heads(cfg, checkpoint: str, steps: int, lr: float = 1e-3) -> str:
    """A linear-probe style test of the features: the trained model frozen, its score heads
    re-initialised and trained alone (full upsampling, the training augmentation) for
    ``steps``; returns the checkpoint of the probed model. If the probed heads select much
    better than the jointly trained ones, the features hold what the heads need."""
    from model.criterion import SegmentationCriterion
    from pipeline.data import load_manifest, shards_of, train_loader
    from pipeline.evaluate_cli import load_checkpoint_model
    from pipeline.train import _SegmentationTransform

    model = load_checkpoint_model(cfg, checkpoint, torch.device("cpu"))[0].train()
    model.requires_grad_(False)
    heads = [blk.score for blk in model.encoder.upsample]
    for head in heads:
        for layer in head:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        head.requires_grad_(True)
    opt = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=lr, weight_decay=0.0)
    d = cfg.data
    loader, _ = train_loader(shards_of(d.train, load_manifest(d.train), "train"),
                             _SegmentationTransform(d.crop, d.scale_range, d.photometric),
                             d.batch_size, 0, 1, 0, cfg.train.seed, d.shuffle_buffer)
    criterion = SegmentationCriterion(cfg.model.num_classes)
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        out = model.encoder(batch["image"], RatioPolicy("full"))
        loss = criterion.score_loss(out.records, batch["label"], batch["scores"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = Path(checkpoint).parent / f"probed-{steps}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="NAME=override[,override...]")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=48, help="training scenes (the demo's 48)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out scenes")
    ap.add_argument("--out", default="score_heads_run")
    ap.add_argument("--tau-scales", default="", help="comma-separated factors: also run eq. 1 with "
                    "tau_s times each (how mIoU trades against GFLOPs)")
    ap.add_argument("--probe", type=int, default=0,
                    help="also retrain each variant's score heads alone on its frozen features for N steps")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out).resolve()
    shards = scenes(out, args.train, args.heldout)
    rows = []
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        cfg, checkpoint = train_variant(name, [o for o in rest.split(",") if o], shards, out,
                                        args.iters, args.seed)
        scales = tuple(float(x) for x in args.tau_scales.split(",") if x)
        rows.append((name, evaluate_variant(cfg, checkpoint, scales)))
        print(f"  {name}: {rows[-1][1]['full'].selection_line()}", flush=True)
        if args.probe:
            rows.append((f"{name} probed", evaluate_variant(cfg, probe_heads(cfg, checkpoint, args.probe))))
            print(f"  {name} probed: {rows[-1][1]['full'].selection_line()}", flush=True)

    def row(values, fmt):
        return " / ".join(format(v, fmt) for v in values)
    print(f"\nDUPS-demo, {args.iters} iterations (seed {args.seed}), {args.train} training scenes, "
          f"{rows[0][1]['full'].images} held-out scenes, {device_name(torch.device('cpu'))}, fp32")
    print("mIoU and GFLOPs of full upsampling, of eq. 1 on the heads' predictions (dynamic) and on "
          "the true edge fractions (oracle); edge recall: the share of true edge tokens the dynamic "
          "run splits")
    print(f"{'variant':<18}{'AUC (full)':<20}{'flat kept':<18}{'mIoU full':>9}{'dyn':>6}{'oracle':>7}"
          f"{'dyn x full':>11}{'oracle x':>9}  {'dynamic split':<20}edge recall")
    for name, res in rows:
        full, dyn, orc = res["full"], res["dynamic"], res["oracle"]
        print(f"{name:<18}{row(full.score_auc, '.2f'):<20}{row(full.flat_kept, '.2f'):<18}"
              f"{full.mIoU:>9.1f}{dyn.mIoU:>6.1f}{orc.mIoU:>7.1f}"
              f"{dyn.gflops_mean / full.gflops_mean:>11.3f}{orc.gflops_mean / full.gflops_mean:>9.3f}  "
              f"{row(dyn.split_ratio, '.2f'):<20}{row(dyn.edge_recall, '.2f')}")

    sweeps = [(name, k, r) for name, res in rows for k, r in res.items() if k.startswith("tau x")]
    if sweeps:
        print("\neq. 1 on the heads' predictions with scaled thresholds")
        print(f"{'variant':<18}{'tau':<9}{'mIoU':>6}{'x full':>8}  {'split':<20}edge recall")
        for name, key, res in sweeps:
            full = dict(rows)[name]["full"]
            print(f"{name:<18}{key:<9}{res.mIoU:>6.1f}{res.gflops_mean / full.gflops_mean:>8.3f}  "
                  f"{row(res.split_ratio, '.2f'):<20}{row(res.edge_recall, '.2f')}")


if __name__ == "__main__":
    main()
