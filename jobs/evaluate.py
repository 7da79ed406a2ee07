"""Reproduce a benchmark of the CASS paper: run the engine with the benchmark's preset on the
dataset's validation split and print mIoU and pixel accuracy next to the published numbers.

Usage::

    python jobs/evaluate.py --benchmark voc21 --data-root data/VOCdevkit [--limit N]
        [--clip-weights FILE --dino-weights FILE | --random-weights SEED] [--device cpu]

Exit status: 0 success, 2 bad input or missing weights (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import sys

from cass_engine.staging import check_weight_choice
from pipeline.audit import AuditError, build_metrics, write_report
from pipeline.audit.report import empty_unmatched
from pipeline.benchmarks import (
    BENCHMARKS,
    comparison_table,
    get_benchmark,
    list_samples,
    run_benchmark,
)
from schemas.uris import public_text

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    p.add_argument("--data-root", required=True,
                   help="dataset folder in the mmsegmentation layout (or its parent)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--clip-weights", default=None, help="OpenAI CLIP ViT-B/16 checkpoint")
    p.add_argument("--dino-weights", default=None, help="official DINO ViT-B/8 checkpoint")
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="seeded random backbones (smoke runs; meaningless numbers)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="images per engine call")
    p.add_argument("--report", default=None, help="also write an audit-style report here")
    p.add_argument("--worst-k", type=int, default=8, help="worst images in the report")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def build_segment_fn(args: argparse.Namespace):
    """Build the engine with the benchmark preset; returns images -> label maps."""
    from cass_engine import CassConfig, build_segmenter
    from cass_engine.weights import WeightsError

    config = CassConfig.from_preset(get_benchmark(args.benchmark).name)
    try:
        segmenter = build_segmenter(config, clip_weights=args.clip_weights,
                                    dino_weights=args.dino_weights,
                                    random_weights=args.random_weights, device=args.device)
    except WeightsError as error:
        raise AuditError(str(error)) from None
    segmenter.set_vocabulary()

    def segment(images):
        results = segmenter.segment(images, return_logits=False, return_probs=False)
        return [r.labels.cpu().numpy() for r in results]

    return segment


def _validate(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise AuditError("--limit must be >= 1")
    if args.batch_size < 1:
        raise AuditError("--batch-size must be >= 1")
    try:
        check_weight_choice(args.clip_weights, args.dino_weights, args.random_weights)
    except ValueError as error:
        raise AuditError(str(error)) from None


def run(args: argparse.Namespace, segment=None) -> int:
    """Evaluate; ``segment`` replaces the engine (tests). Returns the exit status."""
    _validate(args)
    spec = get_benchmark(args.benchmark)
    samples = list_samples(spec, args.data_root, args.limit)  # fail fast, before the engine
    segment = segment or build_segment_fn(args)
    result = run_benchmark(spec, args.data_root, segment, batch_size=args.batch_size,
                           worst_k=args.worst_k if args.report else 0,
                           progress=not args.no_progress, samples=samples)
    print(comparison_table(spec, result))
    if args.random_weights is not None:
        print("note: random weights; the numbers say nothing about quality", file=sys.stderr)
    if args.report:
        sources = {"labels": f"engine preset {spec.name}", "ground_truth":
                   f"{spec.name} at {args.data_root}", "published_mIoU": spec.published_miou,
                   "published_aAcc": spec.published_aacc}
        metrics = build_metrics(result, empty_unmatched(), sources)
        write_report(args.report, result, metrics, {},
                     lambda ref: _read_rgb(ref.source_uri))
    return 0


def _read_rgb(path: str | None):
    from pipeline.audit.sources import load_source_image

    return load_source_image(path, None)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and evaluate; one-line errors with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (AuditError, FileNotFoundError, ValueError) as error:
        print(f"evaluate: error: {public_text(str(error))}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
