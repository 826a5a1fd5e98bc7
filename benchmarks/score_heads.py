"""How selective the score heads become, variant against variant: the demo's model trained
(CPU, no Ray, each variant in a process of its own) on the demo's synthetic scenes under each
variant's config overrides, then evaluated on a held-out set of scenes from the same generator.

Per variant it prints, for the three upsampling blocks (scales 32 / 16 / 8): the ranking AUC
of edge tokens above flat ones and the share of flat tokens predicted under tau_s (both with
full upsampling, every candidate scored; a selective head has both near 1), then mIoU and
GFLOPs under full upsampling, the dynamic ratio (eq. 1 on the head's predictions) and the
oracle's (eq. 1 on the true edge fractions).

    .venv/bin/python benchmarks/score_heads.py --iters 600 [--tau-scales 0.5,0.25] [--losses] \\
        [--oracle-radii 1,2,4] [--oracle-at 1,2,1+2] [--painted] \\
        base= weight10=upsampling.score_weight=10 trained_full=upsampling.policy=full

A variant is NAME=override[,override...] (an empty list: the defaults). Runs and data are
kept under --out; a variant already trained there is only evaluated again.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from common import device_name
from dups.models import RatioPolicy
from dups.config import load_config


def scenes(out: Path, train: int, heldout: int, style: str = "rooms") -> Path:
    """The demo's scenes (128 x 160 +- 32; ``style`` another generator, ``dups.data.synth.STYLES``)
    and ``heldout`` more of the same generator, as shards."""
    from dups.data.prep import prepare
    from dups.data.synth import write_ade20k_layout

    tag = f"{train}-{heldout}" + ("" if style == "rooms" else f"-{style}")
    shards = out / f"shards-{tag}"
    if not (shards / "manifest.json").exists():
        write_ade20k_layout(out / f"src-{tag}", train, heldout, size=(128, 160), style=style)
        prepare("ade20k", str(out / f"src-{tag}"), str(shards), shard_bytes=400_000,
                progress=False, use_ray=False)
    return shards


def _train(cfg, name: str) -> None:
    from dups.cluster.launch import train_local
    from dups.engine.distributed import shutdown

    start = time.perf_counter()
    train_local(cfg)
    print(f"  {name}: trained {cfg.train.iters} iterations in {time.perf_counter() - start:.0f} s "
          "(a process of its own)", flush=True)
    shutdown()


def train_variant(name: str, overrides: list[str], shards: Path, out: Path, iters: int, seed: int):
    """Trains the variant in a process of its own: in one process a second training runs
    ~1.3x slower than the first (measured: 150 iterations 55 s first, 73 s second), which
    would bias the printed training times."""
    import multiprocessing

    from dups.engine.checkpoints import find_checkpoint

    runs = out / "runs" / f"{name}-{iters}-s{seed}"
    if shards.name != "shards-48-32":  # another scene set (--train, --heldout, --style): its runs apart
        runs = out / "runs" / shards.name / runs.name
    cfg = load_config("demo", [f"data.train={shards}", f"train.output={runs}", f"train.iters={iters}",
                               f"train.eval_every={10 * iters}", f"train.checkpoint_every={iters}",
                               f"train.seed={seed}", "launch.launcher=local", "tracking.uri=none",
                               "train.pictures=0", *overrides])
    try:
        return cfg, find_checkpoint(str(runs), cfg.name).url
    except FileNotFoundError:
        pass
    proc = multiprocessing.get_context("spawn").Process(target=_train, args=(cfg, name))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"training variant {name!r} failed (exit code {proc.exitcode}); its log is above")
    return cfg, find_checkpoint(str(runs), cfg.name).url


def three_runs(up) -> dict:
    """{name: (RatioPolicy, oracle)}: full upsampling, eq. 1 on the heads' predictions, and
    eq. 1 on the true edge fractions, with the variant's thresholds."""
    return {"full": (up.ratio_policy("full"), False), "dynamic": (up.ratio_policy("per_image"), False),
            "oracle": (up.ratio_policy("per_image"), True)}


def evaluate_variant(cfg, checkpoint: str, tau_scales: tuple[float, ...] = (),
                     oracle_radii: tuple[int, ...] = (), oracle_at: tuple[tuple[int, ...], ...] = ()) -> dict:
    """Full, dynamic and oracle runs; ``tau_scales``: also dynamic with tau_s times each;
    ``oracle_radii``: also the oracle on edge fractions widened by each radius (the model
    as trained: which tokens would it need split to lose nothing?); ``oracle_at``: also the
    oracle at only these blocks (1, 2, 3), the heads at the others (whose choice loses?),
    on each widened fraction if radii are given, else on the variant's own."""
    from dups.evaluation.run import compare_policies

    up = cfg.upsampling  # the variant's thresholds
    eq1 = up.ratio_policy("per_image")

    def at(prefix: str) -> dict:
        return {f"{prefix} @{'+'.join(map(str, blocks))}": (eq1, blocks) for blocks in oracle_at}

    runs = three_runs(up)
    for scale in tau_scales:
        scaled = dataclasses.replace(up, tau_scale=up.tau_scale * scale)
        runs[f"tau x{scale:g}"] = (scaled.ratio_policy("per_image"), False)
    if not oracle_radii:
        runs.update(at("oracle"))
    results = compare_policies(cfg, checkpoint, runs, torch.device("cpu"))
    for radius in oracle_radii:
        widened = dataclasses.replace(cfg, upsampling=dataclasses.replace(up, edge_radius=radius))
        results.update(compare_policies(widened, checkpoint, {f"oracle r{radius}": (eq1, True), **at(f"oracle r{radius}")},
                                        torch.device("cpu")))
    return results


@torch.no_grad()
def painted(cfg, checkpoint: str):
    """Full upsampling whose mask features are painted by the tokens eq. 1 would keep (the
    heads' scores over tau; ``eq1_masks``): the encoder and the pixel decoder see every token,
    only the painting is sparse. Near the dynamic run: the painting, not the sparse context,
    loses; near full upsampling: the context."""
    from dups.config import EvalConfig
    from dups.data.streams import EvalStream
    from dups.evaluation.evaluate import evaluate
    from dups.evaluation.run import load_checkpoint_model
    from dups.tasks.segmentation import SegmentationEval

    model, _, _, shards = load_checkpoint_model(cfg, checkpoint, torch.device("cpu"))
    forward = model.forward
    model.forward = lambda *args, **kw: forward(*args, eq1_masks=True, **kw)
    samples = list(EvalStream(shards, SegmentationEval.of(cfg), 0, 1, 0))
    return evaluate(model, samples, cfg.model.num_classes, cfg.upsampling.ratio_policy("full"), EvalConfig(),
                    cfg.data.crop, torch.device("cpu"), progress=False)


SMALL_CLASS = 0.05  # a class under this share of the held-out pixels counts as "small"


@torch.no_grad()
def where_lost(cfg, checkpoint: str) -> dict:
    """Where sparse evaluation loses pixels against full upsampling, for the dynamic and the
    oracle runs: {run: {(small class?, patch side of the token painting the pixel, distance
    band to the nearest class boundary): [pixels, lost, gained]}}, where a pixel is lost when
    full upsampling labels it right and the run wrong (gained: the reverse)."""
    import numpy as np
    import torch.nn.functional as F
    from scipy.ndimage import distance_transform_edt

    from dups.models.decoder.densify import cover_pyramid
    from dups.models.edges import edge_map
    from dups.data.streams import EvalStream
    from dups.evaluation.evaluate import _probs
    from dups.evaluation.run import load_checkpoint_model
    from dups.tasks.segmentation import SegmentationEval

    model, _, _, shards = load_checkpoint_model(cfg, checkpoint, torch.device("cpu"))
    samples = list(EvalStream(shards, SegmentationEval.of(cfg), 0, 1, 0))
    runs = three_runs(cfg.upsampling)
    seen = []  # the encoder's output of the last forward: the levels that paint the mask features
    model.encoder.register_forward_hook(lambda module, args, out: seen.append(out))
    counts = np.bincount(np.concatenate([s["label"][s["label"] != 255].numpy() for s in samples]))
    small = torch.from_numpy(counts < SMALL_CLASS * counts.sum())
    table: dict = {"dynamic": {}, "oracle": {}}
    for s in samples:
        label, (h, w) = s["label"], s["size"]
        valid = label != 255
        dist = torch.from_numpy(distance_transform_edt(~edge_map(label).numpy()))
        band = (dist > 2).long() + (dist > 8).long()  # 0: <= 2 px, 1: 2-8 px, 2: > 8 px
        is_small = small[label.clamp(max=len(small) - 1)] & valid
        right, patch = {}, {}
        for name, (policy, oracle) in runs.items():
            maps = {k: m[None] for k, m in s["scores"].items()} if oracle else None
            image = s["image"][None]
            H, W = image.shape[-2:]
            probs, _ = _probs(model, image, policy, (h, w), maps)
            right[name] = F.interpolate(probs, size=label.shape, mode="bilinear").argmax(1)[0] == label
            levels = seen.pop().levels[::-1]  # patch 32 first, the painting order
            cover = cover_pyramid([lv.centres for lv in levels], [lv.patch for lv in levels], H, W)[-1]
            ends = torch.tensor([lv.centres.shape[1] for lv in levels]).cumsum(0)
            sides = torch.tensor([lv.patch for lv in levels])[torch.searchsorted(ends, cover[0], right=True)]
            sides = sides.view(1, 1, H // 4, W // 4).float()
            patch[name] = F.interpolate(F.interpolate(sides, size=(H, W))[..., :h, :w], size=label.shape)[0, 0].long()
        for name in table:
            lost, gained = right["full"] & ~right[name], ~right["full"] & right[name]
            for key in torch.stack([is_small.long(), patch[name], band], -1)[valid].unique(dim=0).tolist():
                where = valid & (is_small.long() == key[0]) & (patch[name] == key[1]) & (band == key[2])
                row = table[name].setdefault(tuple(key), [0, 0, 0])
                row[0] += int(where.sum())
                row[1] += int((where & lost).sum())
                row[2] += int((where & gained).sum())
    return table


def print_losses(name: str, table: dict) -> None:
    bands = ("<= 2 px", "2-8 px", "> 8 px")
    print(f"\n{name}: pixels right with full upsampling and wrong sparse (lost), and the reverse "
          f"(gained), by the class's share (small: under {SMALL_CLASS:.0%} of the pixels), the "
          "side of the token that paints the pixel and its distance to the nearest class boundary")
    print(f"{'run':<9}{'classes':<9}{'token':>6}  {'boundary':<9}{'pixels':>9}{'lost':>8}{'gained':>8}{'net %':>8}")
    for run, rows in table.items():
        for (is_small, side, band), (n, lost, gained) in sorted(rows.items()):
            print(f"{run:<9}{'small' if is_small else 'large':<9}{side:>6}  {bands[band]:<9}{n:>9}{lost:>8}"
                  f"{gained:>8}{100 * (gained - lost) / n:>8.2f}")


def probe_heads(cfg, checkpoint: str, steps: int, lr: float = 1e-3) -> str:
    """A linear-probe style test of the features: the trained model frozen, its score heads
    re-initialised and trained alone (full upsampling, the training augmentation) for
    ``steps``; returns the checkpoint of the probed model. If the probed heads select much
    better than the jointly trained ones, the features hold what the heads need."""
    from dups.models.criterion import SegmentationCriterion
    from dups.data.streams import load_manifest, shards_of, train_loader
    from dups.evaluation.run import load_checkpoint_model
    from dups.tasks.segmentation import SegmentationTransform

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
                             SegmentationTransform.of(cfg),
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
    ap.add_argument("--style", default="rooms", choices=["rooms", "shapes"],
                    help="the scene generator (rooms: the demo's; shapes: rectangles and discs)")
    ap.add_argument("--tau-scales", default="", help="comma-separated factors: also run eq. 1 with "
                    "tau_s times each (how mIoU trades against GFLOPs)")
    ap.add_argument("--oracle-radii", default="", help="comma-separated radii: also run the oracle "
                    "on edge fractions widened by each (upsampling.edge_radius at evaluation only)")
    ap.add_argument("--oracle-at", default="", help="comma-separated block sets (1, 2, 3, 1+2, ...): also "
                    "run the oracle at only these blocks, the heads at the others (on each --oracle-radii)")
    ap.add_argument("--probe", type=int, default=0,
                    help="also retrain each variant's score heads alone on its frozen features for N steps")
    ap.add_argument("--painted", action="store_true", help="also run full upsampling with the mask "
                    "features painted by eq. 1's tokens (does the sparse painting or the sparse context lose?)")
    ap.add_argument("--losses", action="store_true", help="also print where sparse evaluation loses "
                    "pixels against full upsampling (token size, distance to a boundary, small classes)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out).resolve()
    shards = scenes(out, args.train, args.heldout, args.style)
    rows = []
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        cfg, checkpoint = train_variant(name, [o for o in rest.split(",") if o], shards, out,
                                        args.iters, args.seed)
        scales = tuple(float(x) for x in args.tau_scales.split(",") if x)
        radii = tuple(int(x) for x in args.oracle_radii.split(",") if x)
        at = tuple(tuple(int(b) for b in x.split("+")) for x in args.oracle_at.split(",") if x)
        rows.append((name, evaluate_variant(cfg, checkpoint, scales, radii, at)))
        if args.painted:
            rows[-1][1]["painted by eq. 1"] = painted(cfg, checkpoint)
        print(f"  {name}: {rows[-1][1]['full'].selection_line()}", flush=True)
        if args.losses:
            print_losses(name, where_lost(cfg, checkpoint))
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

    sweeps = [(name, k, r) for name, res in rows for k, r in res.items() if k.startswith(("tau x", "oracle r", "oracle @", "painted"))]
    if sweeps:
        print("\neq. 1 on the heads' predictions with scaled thresholds (tau x), and on true edge "
              "fractions widened by r pixels (oracle r), at only the blocks after @ (the heads at the others); "
              "full upsampling painted by eq. 1's tokens")
        print(f"{'variant':<18}{'run':<16}{'mIoU':>6}{'x full':>8}  {'split':<20}edge recall")
        for name, key, res in sweeps:
            full = dict(rows)[name]["full"]
            split = ("-", "-") if key.startswith("painted") else (row(res.split_ratio, '.2f'), row(res.edge_recall, '.2f'))
            print(f"{name:<18}{key:<16}{res.mIoU:>6.1f}{res.gflops_mean / full.gflops_mean:>8.3f}  "
                  f"{split[0]:<20}{split[1]}")


if __name__ == "__main__":
    main()
