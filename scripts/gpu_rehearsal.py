"""The run users launch, rehearsed on one machine without Ray: NCCL (world size 1) on a GPU,
bf16, ZeRO-2, the shipped configs at their per-GPU batch.

1. synthetic ImageNet-layout shards -> ``pretrain_imagenet_tiny`` for a few dozen iterations
   (its final weights exported where fine-tuning looks);
2. synthetic 512-px ADE20K-layout shards -> ``finetune_ade20k_tiny`` from those weights, with
   an evaluation and a checkpoint midway, stopped, resumed to the end, evaluated;
3. ``dups export`` of the fine-tuned checkpoint, read back.
Prints images/s, step time, peak memory, achieved TFLOP/s and model FLOPs utilisation per
phase, and the evaluation. ``--smoke``: the same steps at toy sizes on the CPU (the tests).
Usage: ``bash scripts/gpu_rehearsal.sh [--smoke] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path


from dups.cluster.launch import train_local
from dups.data.prep import prepare
from dups.data.synth import write_ade20k_layout, write_imagenet_layout
from dups.engine.checkpoints import model_state
from dups.config import load_config
from dups.engine.distributed import shutdown
from dups.engine.export import export_weights

SIZES = {  # per mode: data sizes and the overrides that make a step small enough
    "gpu": dict(classes=8, per_class=48, val_per_class=4, imagenet_side=(256, 320), scenes=64, val_scenes=16,
                scene_side=(512, 683), pre_iters=30, fine_iters=60, fine_stop=40, workers=4,
                pre=[], fine=["data.max_eval_images=16"]),
    "smoke": dict(classes=4, per_class=4, val_per_class=1, imagenet_side=(48, 56), scenes=8, val_scenes=2,
                  scene_side=(96, 128), pre_iters=3, fine_iters=6, fine_stop=4, workers=0,
                  pre=["model.name=dups_demo", "data.image_size=32", "data.batch_size=4"],
                  fine=["model.name=dups_demo", "data.crop=64", "data.batch_size=2", "data.eval_short_side=0",
                        "data.max_eval_images=2"]),
}


def phase_line(name: str, result, seconds: float) -> str:
    last = dict(result.logged[-1][1]) if result.logged else {}
    mfu = f"{100 * last['train/mfu']:.1f}%" if "train/mfu" in last else "n/a (CPU, fp32 or an unknown GPU)"
    return (f"{name}: {result.steps} steps in {seconds:.0f} s; last window: "
            f"{last.get('train/images_per_s', float('nan')):.1f} images/s, step "
            f"{1000 * last.get('train/step_time_s', float('nan')):.0f} ms, data wait "
            f"{1000 * last.get('train/data_wait_s', float('nan')):.0f} ms, peak memory "
            f"{last.get('train/memory_gb', float('nan')):.2f} GiB, "
            f"{last.get('train/tflops_per_s', float('nan')):.2f} TFLOP/s achieved, MFU {mfu}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", default="/tmp/dups-rehearsal")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    mode = "smoke" if args.smoke else "gpu"
    z = SIZES[mode]
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_rehearsal: no CUDA device (use --smoke for the CPU version)")
    device = "cpu" if mode == "smoke" else torch.cuda.get_device_name()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()

    write_imagenet_layout(out / "src-imagenet", z["classes"], z["per_class"], z["val_per_class"], z["imagenet_side"])
    write_ade20k_layout(out / "src-ade20k", z["scenes"], z["val_scenes"], z["scene_side"], seed=3)
    prepare("imagenet", str(out / "src-imagenet"), str(out / "imagenet"), shard_bytes=2_000_000,
            progress=False, use_ray=False)
    prepare("ade20k", str(out / "src-ade20k"), str(out / "ade20k"), shard_bytes=8_000_000,
            progress=False, use_ray=False)
    print(f"[rehearsal] data ready in {time.perf_counter() - started:.0f} s", flush=True)

    common = [f"train.output={out / 'runs'}", "tracking.uri=none", "launch.launcher=local", "launch.workers=1",
              f"data.workers={z['workers']}", "train.log_every=10" if mode == "gpu" else "train.log_every=1"]
    if mode == "smoke":
        common += ["launch.use_gpu=false", "engine.precision=fp32"]
    report = [f"device: {device}; torch {torch.__version__}"]
    try:
        pre = load_config("pretrain_imagenet_tiny", common + z["pre"] + [
            f"data.train={out / 'imagenet'}", f"model.num_classes={z['classes']}", f"train.iters={z['pre_iters']}",
            f"train.eval_every={z['pre_iters']}", f"train.checkpoint_every={z['pre_iters']}", "optim.warmup_iters=5"])
        t0 = time.perf_counter()
        result = train_local(pre)
        report.append(phase_line("pretrain_imagenet_tiny", result, time.perf_counter() - t0))
        report.append(f"  evaluation: top-1 {result.eval['val/top1']:.1f}%, top-5 {result.eval['val/top5']:.1f}% "
                      f"on {result.eval['val/images']:.0f} images")
        weights = out / "runs" / pre.name / f"{pre.name}.safetensors"
        fine_overrides = common + z["fine"] + [
            f"data.train={out / 'ade20k'}", f"train.pretrained={weights}", f"train.iters={z['fine_iters']}",
            f"train.eval_every={z['fine_stop'] // 2}", f"train.checkpoint_every={z['fine_stop'] // 2}",
            "optim.warmup_iters=10"]
        fine = load_config("finetune_ade20k_tiny", fine_overrides)
        t0 = time.perf_counter()
        first = train_local(fine, stop_after=z["fine_stop"])
        report.append(phase_line(f"finetune_ade20k_tiny to step {z['fine_stop']}", first, time.perf_counter() - t0))
        report.append(f"  evaluation at step {z['fine_stop']}: " + _seg_eval(first.eval))
        t0 = time.perf_counter()
        second = train_local(load_config("finetune_ade20k_tiny", fine_overrides), resume=str(out / "runs"))
        assert second.steps == z["fine_iters"], second.steps
        report.append(phase_line(f"finetune_ade20k_tiny resumed to step {second.steps}", second,
                                 time.perf_counter() - t0))
        report.append(f"  evaluation at step {second.steps}: " + _seg_eval(second.eval))
    finally:
        shutdown()
    exported = out / "finetune_ade20k_tiny.safetensors"
    source = export_weights(str(out / "runs"), str(exported), fine.name)
    state, _ = model_state(str(exported))
    report.append(f"export: {source} -> {exported} ({sum(v.numel() for v in state.values()) / 1e6:.2f} M fp32 "
                  f"parameters)")
    report.append(f"total {time.perf_counter() - started:.0f} s")
    print("\n[rehearsal] " + "\n[rehearsal] ".join(report), flush=True)
    return 0


def _seg_eval(metrics: dict) -> str:
    return (f"mIoU {metrics['val/mIoU']:.1f}%, GFLOPs {metrics['val/gflops_mean']:.1f} "
            f"+- {metrics['val/gflops_std']:.1f}, split ratios "
            + " / ".join(f"{metrics.get(f'val/split_ratio_block{b}', float('nan')):.2f}" for b in (1, 2, 3)))


if __name__ == "__main__":
    sys.exit(main())
