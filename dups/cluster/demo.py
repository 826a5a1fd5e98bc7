"""`dups demo`: the whole pipeline on one CPU machine with embedded defaults.

synthetic scenes (ADE20K layout) -> `prep` on local Ray -> fine-tuning of the demo-size DUPS
with 2 Ray Train workers under DeepSpeed ZeRO-2 -> evaluation -> MLflow store in the working
directory. Prints mIoU, the FLOPs of dynamic vs full upsampling, and how to open the MLflow UI.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("dups.demo")


def run_demo(out: str = "demo_run", iters: int = 300, train_images: int = 48, val_images: int = 8,
             workers: int = 2, extra: list[str] = ()) -> dict:
    import ray

    from dups.data.prep import prepare
    from dups.cluster.local_ray import init_ray
    from dups.data.synth import write_ade20k_layout
    from dups.config import load_config
    from dups.cluster.credentials import redact
    from dups.evaluation.run import run_eval
    from dups.tracking.runs import resolve_uri

    from dups.cluster.launch import train_ray

    start = time.perf_counter()
    root = Path(out).resolve()
    print(f"[1/4] synthetic scenes -> {root / 'src'}", flush=True)
    write_ade20k_layout(root / "src", train_images, val_images, size=(128, 160))
    init_ray(num_cpus=workers, log_to_driver=False)
    try:
        print("[2/4] prep: WebDataset shards with edge-score maps (Ray job)", flush=True)
        manifest = prepare("ade20k", str(root / "src"), str(root / "shards"), shard_bytes=400_000,
                           progress=False)
        print(f"      {manifest['splits']['train']['samples']} train / {manifest['splits']['val']['samples']} "
              f"val samples, {len(manifest['rejected'])} rejected", flush=True)
        cfg = load_config("demo", [f"data.train={root / 'shards'}", f"train.output={root / 'runs'}",
                                   f"train.iters={iters}", f"train.eval_every={max(1, iters // 3)}",
                                   f"train.checkpoint_every={max(1, iters // 2)}",
                                   f"launch.workers={workers}", *extra])
        print(f"[3/4] train: {cfg.model.name} on {workers} Ray Train workers, DeepSpeed ZeRO-"
              f"{cfg.engine.zero_stage}, {iters} iterations", flush=True)
        result = train_ray(cfg)
    finally:
        ray.shutdown()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    print("[4/4] eval: dynamic upsampling (eq. 1 per image) and full upsampling", flush=True)
    checkpoint = result.checkpoint.path
    _, dynamic = run_eval(cfg, checkpoint)
    full_cfg = load_config("demo", [f"data.train={root / 'shards'}", "upsampling.policy=full",
                                    "train.pictures=0", *extra])
    _, full = run_eval(full_cfg, checkpoint)
    summary = {"mIoU": dynamic.mIoU, "mAcc": dynamic.mAcc, "aAcc": dynamic.aAcc, "gflops_dynamic": dynamic.gflops_mean, "gflops_dynamic_std": dynamic.gflops_std,
               "gflops_full": full.gflops_mean, "mIoU_full": full.mIoU, "checkpoint": checkpoint,
               "seconds": time.perf_counter() - start, "tokens_dynamic": dynamic.tokens_per_stage,
               "tokens_full": full.tokens_per_stage}
    chance = 1 / 8  # eight synthetic classes
    print(f"\nmIoU (dynamic upsampling): {dynamic.mIoU:.1f}%  (aAcc {dynamic.aAcc:.1f}%, mAcc {dynamic.mAcc:.1f}%; "
          f"chance ~{100 * chance:.0f}%; full upsampling: mIoU {full.mIoU:.1f}%)")
    print(f"GFLOPs per image (multiply-adds): dynamic {dynamic.gflops_mean:.3f} +- {dynamic.gflops_std:.3f}, "
          f"full {full.gflops_mean:.3f} ({dynamic.gflops_mean / full.gflops_mean:.2f}x)")
    print("tokens per stage: dynamic " + " / ".join(f"{t:.0f}" for t in dynamic.tokens_per_stage)
          + ", full " + " / ".join(f"{t:.0f}" for t in full.tokens_per_stage))
    if dynamic.split_ratio:
        print(dynamic.selection_line())
    if iters < 600 and full.mIoU - dynamic.mIoU > 1:
        print(f"note: after {iters} iterations the model is not yet sure of a small object's inside painted by one "
              "coarse token; on these scenes dynamic upsampling runs 1.0 below full after 300 iterations on average "
              "over five seeds (0.7 above to 2.0 below) and above it by 1500 (BENCHMARKS.md section 1b; "
              "`dups demo --iters 1500`)")
    print(f"finished in {summary['seconds'] / 60:.1f} min; checkpoint {checkpoint}")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {redact(resolve_uri(cfg.tracking.uri))} "
          f"--host 127.0.0.1  (token-selection pictures are in each run's artifacts/pictures)")
    return summary
