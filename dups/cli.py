"""The ``dups`` command line: one entry point over the model, data and training jobs."""
from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import re
import sys

from dups.models.config import ENCODERS
from dups.models.ratios import PRESETS


def _summary(args: argparse.Namespace) -> int:
    from dups.evaluation.measure import summarize

    s = summarize(args.model, args.image_size, args.ratio, args.preset, args.task, args.classes)
    if args.json:
        print(json.dumps(s.as_dict(), indent=2))
        return 0
    print(f"model            {s.model}, {s.task} (ratio: {s.ratio}, preset: {s.preset}, "
          f"image {s.image_size}x{s.image_size}, {s.num_classes} classes)")
    print(f"parameters       backbone {s.params_backbone_m:.2f} M + decoder "
          f"{s.params_decoder_m:.2f} M = {s.params_total_m:.2f} M")
    print(f"GFLOPs           {s.gflops:.2f}   [{s.flop_convention}]")
    print(f"tokens per stage {' / '.join(map(str, s.tokens_per_stage))}")
    print(f"CPU latency      {s.latency_ms:.0f} ms (one image, eager, random weights)")
    return 0


def _prep(args: argparse.Namespace) -> int:
    import logging

    from dups.data.prep import prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = prepare(args.dataset, args.src, args.out, splits=tuple(args.splits),
                       shard_bytes=int(args.shard_size * 1e6), address=args.address,
                       num_cpus=args.num_cpus, forward_credentials=args.forward_credentials)
    counts = ", ".join(f"{k}: {v['samples']} samples in {len(v['shards'])} shards"
                       for k, v in manifest["splits"].items())
    print(f"prepared {args.dataset} -> {args.out} ({counts}); "
          f"{len(manifest['rejected'])} inputs rejected (listed in manifest.json)")
    for bad in manifest["rejected"][:20]:
        print(f"  rejected {bad['file']}: {bad['reason']}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from dups.data.synth import write_ade20k_layout

    out = write_ade20k_layout(args.out, args.train, args.val, (args.height, args.width), args.seed)
    print(f"wrote {args.train} train + {args.val} val synthetic scenes in the ADE20K layout under {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dups.config import load_config
    from dups.engine.progress import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    resume = None
    if args.resume is not None:  # bare --resume: this config's own train.output
        resume = args.resume or cfg.train.output
    if cfg.launch.launcher == "local":
        from dups.cluster.launch import train_local
        from dups.engine.distributed import shutdown

        try:
            result = train_local(cfg, resume=resume)
        finally:
            shutdown()
        print(f"trained {cfg.name}: {result.steps} steps, MLflow run {result.run_id}, "
              f"last checkpoint {result.last_checkpoint}")
    else:
        from dups.cluster.launch import train_ray

        result = train_ray(cfg, resume=resume)
        print(f"trained {cfg.name} on Ray: checkpoint {result.checkpoint}")
    from dups.cluster.credentials import redact
    from dups.tracking.runs import resolve_uri

    print(f"open the MLflow UI: mlflow ui --backend-store-uri {redact(resolve_uri(cfg.tracking.uri))}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dups.config import load_config
    from dups.evaluation.run import run_eval
    from dups.engine.trainer import check_inputs

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg, pretrained=False)
    print(run_eval(cfg, args.checkpoint)[0])
    return 0


def _export(args: argparse.Namespace) -> int:
    from dups.engine.export import config_path, export_weights

    source = export_weights(args.checkpoint, args.out)
    print(f"exported {source} -> {args.out} (fp32 safetensors; config in {config_path(args.out)})")
    if args.mlflow or args.register:
        from dups.cluster.credentials import redact
        from dups.tracking.runs import log_exported
        from dups.tracking.runs import resolve_uri

        model_uri, run_id = log_exported(args.out, source, args.tracking_uri, args.register)
        print(f"logged the MLflow model {model_uri} (run {run_id}, store {redact(resolve_uri(args.tracking_uri))})"
              + (f", registered as {args.register}" if args.register else ""))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import logging

    import torch

    from dups.config import load_config
    from dups.apis.inference import predict_images
    from dups.apis.pretrained import load_pretrained

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                         "use --device cpu (or auto)")
    if args.ray:
        from dups.apis.batch_inference import predict_on_ray

        if args.tokens or args.stats or args.config or args.bf16 or args.bucket is not None:
            raise ValueError("--ray writes labels and overlays: --tokens, --stats, --config, --bf16 and "
                             "--bucket are for the one-process run")
        report = predict_on_ray(args.checkpoint, args.images, args.out, args.batch_size, args.actors,
                                args.short_side, args.dataset, args.address,
                                use_gpu=None if args.device == "auto" else device.startswith("cuda"))
        print(f"segmented {report.images} images with {report.source} into {report.out} on Ray "
              f"({report.seconds:.1f} s); {len(report.failed)} unreadable"
              + (f" (listed in {report.out}/report.json)" if report.failed else ""))
        return 1 if report.failed else 0
    config = load_config(args.config) if args.config else None
    pre = load_pretrained(args.checkpoint, device, config)
    if args.bf16:
        pre.model.to(torch.bfloat16)
    if args.bucket is not None:
        encoder = pre.model.encoder
        encoder.ratio_policy = dataclasses.replace(encoder.ratio_policy, bucket=args.bucket)
    report = predict_images(pre, args.images, args.out, args.batch_size, args.workers,
                            tokens=args.tokens, stats=args.stats, dataset=args.dataset,
                            short_side=args.short_side)
    print(f"segmented {report.images} images with {report.source} into {report.out} "
          f"({report.seconds:.1f} s); {len(report.failed)} unreadable"
          + (f" (listed in {report.out}/report.json)" if report.failed else ""))
    return 1 if report.failed else 0


def _demo(args: argparse.Namespace) -> int:
    import logging

    from dups.cluster.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(args.out, args.iters, args.train_images, args.val_images, args.workers, args.overrides)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from dups.cluster.submit import submit

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    submit(command, args.address, args.follow, args.working_dir, args.pip,
           forward_credentials=args.forward_credentials, python=args.python, known=list(build_parser()[1]))
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from dups.cluster.submit import jobs

    if args.action in ("logs", "stop") and not args.job_id:
        raise ValueError(f"dups jobs {args.action} needs a job id")
    jobs(args.action, args.job_id, args.address)
    return 0


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``dups`` parser and its subcommands' parsers by name."""
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="dups", description=__doc__)
    try:
        installed = version("dups")
    except PackageNotFoundError:  # run from a checkout without installing
        installed = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"dups {installed}")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Help))
    p = sub.add_parser("summary", help="parameters, GFLOPs and tokens per stage of a model")
    p.add_argument("--model", default="dups_tiny", choices=sorted(ENCODERS), help="the model size")
    p.add_argument("--image-size", type=int, default=512, help="side of the square random image")
    p.add_argument("--ratio", default="full", choices=["full", "fixed", "dynamic", "random"],
                   help="the upsampling policy (dynamic: random weights, an untrained score head)")
    p.add_argument("--preset", default="ade20k", choices=sorted(PRESETS), help="Table 8's thresholds and betas")
    p.add_argument("--task", default="segmentation", choices=["segmentation", "backbone"],
                   help="the whole segmentor, or the encoder alone")
    p.add_argument("--classes", type=int, default=150, help="classes of the segmentation head")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_summary)

    p = sub.add_parser("prep", help="shard a dataset into WebDataset tars with a Ray job")
    p.add_argument("dataset", choices=["imagenet", "ade20k", "cocostuff", "cityscapes"])
    p.add_argument("--src", required=True, help="the dataset in its published layout")
    p.add_argument("--out", required=True, help="a directory or s3://bucket/prefix")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--shard-size", type=float, default=1000.0, help="MB of source files per shard")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="the splits to write")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--forward-credentials", action="store_true",
                   help="also pass AWS keys/tokens to the Ray tasks (Ray's API shows them to anyone who "
                   "reaches the cluster; default: the nodes' instance role, settings only)")
    p.set_defaults(func=_prep)

    p = sub.add_parser("synth", help="write synthetic scenes in the ADE20K layout")
    p.add_argument("--out", required=True, help="folder for images/ and annotations/")
    p.add_argument("--train", type=int, default=32, help="training scenes")
    p.add_argument("--val", type=int, default=8, help="validation scenes")
    p.add_argument("--height", type=int, default=256, help="mean height (each scene +-32 px)")
    p.add_argument("--width", type=int, default=320, help="mean width (each scene +-32 px)")
    p.add_argument("--seed", type=int, default=0, help="the scenes' random seed")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train (pretrain or finetune) from a config")
    p.add_argument("config", help="a YAML file, or the name of a config shipped in dups/configs (e.g. demo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iters=100")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue the run from its last checkpoint (or from the given directory)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    p.add_argument("config", help="the config the checkpoint was trained with (a YAML file or a shipped name)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.multi_scale=true eval.flip=true")
    p.add_argument("--checkpoint", required=True, help="exported weights (.safetensors), a checkpoint, "
                   "a run's folder or a train.output (local or s3://): its newest complete checkpoint")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="a checkpoint's fp32 weights as safetensors (+ its config)")
    p.add_argument("checkpoint", help="a checkpoint, a run's folder or a train.output (local or s3://)")
    p.add_argument("out", help="OUT.safetensors (local or s3://); OUT.json gets the config")
    p.add_argument("--mlflow", action="store_true", help="also log the weights as an MLflow model (pyfunc: "
                   "image bytes in, label PNG out) in the run that trained them, else a new run")
    p.add_argument("--register", default="", help="also register that model under this name (implies --mlflow)")
    p.add_argument("--tracking-uri", default="", help="the MLflow store (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mlruns.db here)")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="segment images with trained weights")
    p.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="exported .safetensors (its .json beside it) or a "
                   "checkpoint, run folder or train.output (local or s3://)")
    p.add_argument("--out", required=True, help="folder for labels/, overlay/, tokens/, report.json")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward: images of one size run as "
                   "one packed batch, each with its own eq. 1 budget (--tokens and --stats run one by one)")
    p.add_argument("--bucket", type=float, default=None, help="pad eq. 1's budgets to multiples of this "
                   "fraction of the candidates (fewer shapes for a compiled forward; same labels)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    p.add_argument("--short-side", type=int, default=None, help="the short side each image runs at, labels "
                   "written at the image's own size (default: the weights' data.eval_short_side, as "
                   "evaluation runs; 0 = every image as it is, memory growing with its size)")
    p.add_argument("--tokens", action="store_true", help="also the token-selection picture of each image")
    p.add_argument("--stats", action="store_true", help="also GFLOPs and tokens per stage of each image "
                   "(stats.jsonl)")
    p.add_argument("--dataset", default=None, choices=["ade20k", "cocostuff", "cityscapes"],
                   help="label ids to write (default: the dataset the weights were trained on)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 weights: no per-forward weight casts (GPU)")
    p.add_argument("--config", default=None, help="the config the weights were trained with, when no "
                   "config was saved with them")
    p.add_argument("--ray", action="store_true", help="on a Ray cluster with Ray Data: inputs and --out may "
                   "be s3:// prefixes; one model actor per GPU (or CPU); labels and overlays")
    p.add_argument("--actors", type=int, default=None, help="with --ray: model actors (default: one per GPU "
                   "of the cluster, else one per CPU)")
    p.add_argument("--address", default=None, help="with --ray: the Ray cluster (default: $RAY_ADDRESS, else "
                   "a local Ray)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("demo", help="the whole pipeline on this machine: synth, prep, train, eval")
    p.add_argument("--out", default="demo_run", help="folder for the scenes, shards and checkpoints")
    p.add_argument("--iters", type=int, default=300, help="training iterations")
    p.add_argument("--train-images", type=int, default=48, help="synthetic training scenes")
    p.add_argument("--val-images", type=int, default=8, help="synthetic validation scenes")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU processes)")
    p.add_argument("overrides", nargs="*", help="config overrides for the demo run")
    p.set_defaults(func=_demo)

    p = sub.add_parser("submit", help="run a dups command as a Ray job on a cluster")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default $RAY_ADDRESS or "
                   "http://127.0.0.1:8265)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's code")
    p.add_argument("--pip", nargs="*", default=None, help="extra packages for the job's environment")
    p.add_argument("--forward-credentials", action="store_true",
                   help="also pass AWS keys/tokens and MLflow passwords to the job (Ray's job API shows "
                   "them to anyone who reaches the dashboard; default: the cluster's instance role)")
    p.add_argument("--python", default=None, help="the head's Python that has the project installed "
                   "(default: this interpreter if the head has it, else python3 or python there)")
    p.add_argument("command_line", nargs=argparse.REMAINDER, help="-- then the dups command")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="list Ray jobs, print one's logs, or stop one")
    p.add_argument("action", choices=["list", "logs", "stop"], help="what to do")
    p.add_argument("job_id", nargs="?", help="the job (logs, stop)")
    p.add_argument("--address", default=None, help="Ray dashboard URL (default $RAY_ADDRESS or "
                   "http://127.0.0.1:8265)")
    p.set_defaults(func=_jobs)
    return parser, sub.choices


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Options anywhere, as people type them (``dups eval demo --checkpoint C key=value``).

    Plain argparse stops filling a positional list at the first option, so each subcommand
    is parsed intermixed; ``submit`` keeps its ``-- command`` tail verbatim."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in commands or argv[0] == "submit":
        return parser.parse_args(argv)
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    resume = getattr(args, "resume", None)
    if resume and _OVERRIDE.match(resume):  # `--resume key=value`: a bare --resume, then an override
        args.overrides = [resume, *args.overrides]
        args.resume = ""
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # bad input: one clear line
        print(f"dups {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
