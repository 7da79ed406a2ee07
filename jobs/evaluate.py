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

from jobs.help_text import default_helper, given
from pipeline.audit import AuditError, build_metrics, write_report
from pipeline.audit.benchmarks import (
    BENCHMARKS,
    EvaluateConfig,
    comparison_table,
    list_samples,
    run_benchmark,
)
from pipeline.audit.report import empty_unmatched
from schemas.uris import public_text

EXIT_INPUT_ERROR = 2


_default = default_helper(EvaluateConfig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every optional flag defaults to ``None`` so that the value
    left out comes from :class:`EvaluateConfig` (``dest`` = the field name)."""
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS), metavar="NAME",
                   help=f"the paper's benchmark to reproduce: {', '.join(BENCHMARKS)} "
                   "(required; data layouts in the README, 'Reproducing the paper')")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="dataset folder in the mmsegmentation layout (or its parent)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N images only " + _default("limit", "all"))
    p.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="OpenAI CLIP ViT-B/16 checkpoint "
                   + _default("clip_weights", "the official weights, downloaded"))
    p.add_argument("--dino-weights", default=None, metavar="FILE",
                   help="official DINO ViT-B/8 checkpoint "
                   + _default("dino_weights", "the official weights, downloaded"))
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="seeded random backbones (smoke runs; meaningless numbers) "
                   + _default("random_weights", "off"))
    p.add_argument("--device", default=None, help=f"torch device {_default('device')}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per engine call {_default('batch_size')}")
    p.add_argument("--report", dest="report_dir", metavar="DIR", default=None,
                   help="also write an audit-style report to this directory "
                   + _default("report_dir", "no report"))
    p.add_argument("--worst-k", type=int, default=None,
                   help=f"worst images shown in the report {_default('worst_k')}")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress display on stderr "
                   + _default("progress", true="progress shown", false="no progress"))
    return p


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The :class:`EvaluateConfig` of parsed arguments; flags left out take its defaults."""
    return EvaluateConfig(**given(vars(args)))


def build_segment_fn(config: EvaluateConfig):
    """Build the engine with the benchmark preset; returns images -> label maps."""
    from cass_engine import CassConfig, build_segmenter
    from cass_engine.weights import WeightsError

    engine_config = CassConfig.from_preset(config.spec.name)
    try:
        segmenter = build_segmenter(engine_config, clip_weights=config.clip_weights,
                                    dino_weights=config.dino_weights,
                                    random_weights=config.random_weights, device=config.device)
    except WeightsError as error:
        raise AuditError(str(error)) from None
    segmenter.set_vocabulary()

    def segment(images):
        results = segmenter.segment(images, return_logits=False, return_probs=False)
        return [r.labels.cpu().numpy() for r in results]

    return segment


def run(config: EvaluateConfig, segment=None) -> int:
    """Evaluate; ``segment`` replaces the engine (tests). Returns the exit status."""
    spec = config.spec
    samples = list_samples(spec, config.data_root, config.limit)  # fail fast, before the engine
    segment = segment or build_segment_fn(config)
    result = run_benchmark(spec, config.data_root, segment, batch_size=config.batch_size,
                           worst_k=config.worst_k if config.report_dir else 0,
                           progress=config.progress, samples=samples)
    print(comparison_table(spec, result))
    if config.random_weights is not None:
        print("note: random weights; the numbers say nothing about quality", file=sys.stderr)
    if config.report_dir:
        sources = {"labels": f"engine preset {spec.name}", "ground_truth":
                   f"{spec.name} at {config.data_root}", "published_mIoU": spec.published_miou,
                   "published_aAcc": spec.published_aacc}
        metrics = build_metrics(result, empty_unmatched(), sources)
        write_report(config.report_dir, result, metrics, {},
                     lambda ref: _read_rgb(ref.source_uri))
    return 0


def _read_rgb(path: str | None):
    from pipeline.audit.sources import load_source_image

    return load_source_image(path, None)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and evaluate; one-line errors with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(config_from_args(args))
    except (AuditError, FileNotFoundError, ValueError) as error:
        print(f"evaluate: error: {public_text(str(error))}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
