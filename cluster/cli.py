"""The ``dups`` command line: one entry point over the model, data and training jobs."""
from __future__ import annotations

import argparse
import json
import sys

from model.config import ENCODERS
from model.ratios import PRESETS


def _summary(args: argparse.Namespace) -> int:
    from pipeline.measure import summarize

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dups", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="parameters, GFLOPs and tokens per stage of a model")
    p.add_argument("--model", default="dups_tiny", choices=sorted(ENCODERS))
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--ratio", default="full", choices=["full", "fixed", "dynamic", "random"])
    p.add_argument("--preset", default="ade20k", choices=sorted(PRESETS))
    p.add_argument("--task", default="segmentation", choices=["segmentation", "backbone"])
    p.add_argument("--classes", type=int, default=150, help="classes of the segmentation head")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"dups {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
