"""Audit pipeline labels against held-out ground truth and write a report.

Usage::

    python jobs/audit.py --labels OUTPUT --ground-truth URI [--gt-format coco|masks|parquet]
        [--category-map JSON|FILE] --report DIR [--fail-under MIOU] [--calibrate-precision P]
    python jobs/audit.py --labels OUTPUT --gt-format labelstudio --ground-truth EXPORT.json ...
    python jobs/audit.py --labels OUTPUT --label-studio-url URL --project NAME_OR_ID ...

Label Studio's API token is read from the environment variable ``LABEL_STUDIO_API_KEY``.

Exit status: 0 success, 1 mIoU below ``--fail-under``, 2 bad input (one-line message on
stderr). Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from argparse import ArgumentTypeError

from jobs.help_text import default_helper, given
from pipeline.audit import AuditConfig, AuditError, run_audit
from pipeline.audit.auditing import GT_FORMATS
from pipeline.audit.gt_coco import UNLABELED_CHOICES
from pipeline.config import storage_options_argument
from schemas.uris import public_text

EXIT_INPUT_ERROR = 2


_default = default_helper(AuditConfig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every optional flag defaults to ``None`` so that the value
    left out comes from :class:`AuditConfig` (``dest`` = the field name)."""
    p = argparse.ArgumentParser(prog="audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="pipeline output root (labels/ + run.json)")
    p.add_argument("--ground-truth", default=None,
                   help="COCO JSON file, folder/prefix of mask PNGs, labels-schema output, or "
                   "Label Studio JSON export (required unless --label-studio-url)")
    p.add_argument("--gt-format", choices=GT_FORMATS, default=None,
                   help=f"ground-truth format {_default('gt_format', 'detected from the URI')}")
    p.add_argument("--category-map", default=None,
                   help="JSON object {vocabulary class: gt category name | id | null}, inline "
                   "or in a file (path or URL) "
                   + _default("category_map", "classes matched by name and synonyms"))
    p.add_argument("--report", dest="report_dir", metavar="DIR", required=True,
                   help="report directory (any fsspec URI)")
    p.add_argument("--fail-under", type=float, default=None, metavar="MIOU",
                   help="exit with status 1 when mIoU (percent) is below this "
                   + _default("fail_under", "no bar"))
    p.add_argument("--gt-classes", default=None,
                   help="class list of mask ground truth "
                   + _default("gt_classes", "ROOT/classes.txt"))
    p.add_argument("--mask-suffix", default=None,
                   help=f"mask file-name ending {_default('mask_suffix')}")
    p.add_argument("--reduce-zero-label", action="store_true", default=None,
                   help="masks: value 0 is unlabeled (mmseg reduce_zero_label) "
                   + _default("reduce_zero_label"))
    p.add_argument("--image-suffix", default=None,
                   help="image file-name ending removed from label keys when matching mask "
                   "names (e.g. _leftImg8bit.png for Cityscapes gtFine masks) "
                   + _default("image_suffix", "keys used as they are"))
    p.add_argument("--coco-unlabeled", choices=UNLABELED_CHOICES, default=None,
                   help="COCO: pixels without annotation are 'background' or ignored "
                   + _default("coco_unlabeled"))
    p.add_argument("--worst-k", type=int, default=None,
                   help=f"worst images shown with overlays {_default('worst_k')}")
    p.add_argument("--coco-ap", action="store_true", default=None,
                   help="also compute COCOeval segm AP over per-(image, class) regions "
                   + _default("coco_ap"))
    p.add_argument("--storage-options", default=None,
                   help="JSON object of fsspec storage options for every URI, or @FILE "
                   "naming a file that holds one (keeps secrets off the command line) "
                   + _default("storage_options"))
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress display on stderr "
                   + _default("progress", true="progress shown", false="no progress"))
    p.add_argument("--label-studio-url", default=None, metavar="URL",
                   help="pull the reviewed ground truth from this Label Studio server "
                   "(token from $LABEL_STUDIO_API_KEY); implies --gt-format labelstudio "
                   + _default("label_studio_url", "read --ground-truth"))
    p.add_argument("--project", dest="label_studio_project", default=None, metavar="NAME_OR_ID",
                   help="Label Studio project title or id (with --label-studio-url) "
                   + _default("label_studio_project"))
    p.add_argument("--calibrate-precision", type=float, default=None, metavar="P",
                   help="also write thresholds.json: per class the lowest confidence "
                   "threshold whose pixel precision reaches P (0..1; needs confidence) "
                   + _default("calibrate_precision", "no thresholds"))
    return p


def _label_studio_args(args: argparse.Namespace) -> dict:
    """The Label Studio part of the config (pulling the ground truth from a server)."""
    if not args.label_studio_url:
        if not args.ground_truth:
            raise AuditError("--ground-truth is required (or --label-studio-url and --project)")
        return {}
    if args.gt_format not in (None, "labelstudio"):
        raise AuditError("--label-studio-url reads Label Studio ground truth; drop --gt-format "
                         f"{args.gt_format}")
    if not args.label_studio_project:
        raise AuditError("--label-studio-url needs --project NAME_OR_ID")
    token = os.environ.get("LABEL_STUDIO_API_KEY")
    if not token:
        raise AuditError("--label-studio-url needs the API token in $LABEL_STUDIO_API_KEY")
    return {"gt_format": "labelstudio", "label_studio_token": token,
            "ground_truth": args.ground_truth or f"{args.label_studio_url} project "
            f"{args.label_studio_project}"}


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """Turn parsed arguments into an :class:`AuditConfig` (raises ``AuditError``); flags left
    out (``None``) take the dataclass's defaults."""
    values = given(vars(args))
    raw_options = values.pop("storage_options", None)
    if raw_options:
        try:  # parsed here (not as an argparse type) to keep the one-line error contract
            values["storage_options"] = storage_options_argument(raw_options)
        except ArgumentTypeError as error:
            raise AuditError(f"--storage-options: {error}") from None
    return AuditConfig(**{**values, **_label_studio_args(args)})


def _print_summary(metrics: dict, files: list[str]) -> None:
    def fmt(value):
        return "n/a" if value is None else f"{value:.2f}"

    un = metrics["unmatched"]
    print(f"images {metrics['num_images']}  mIoU {fmt(metrics['mIoU'])}  "
          f"aAcc {fmt(metrics['aAcc'])}  mAcc {fmt(metrics['mAcc'])}  "
          f"presence mAP {fmt(metrics['presence_mAP'])}")
    print(f"unmatched: ground truth {un['ground_truth']}, predictions {un['predictions']}, "
          f"failed {un['failed_predictions']}, invalid {un['invalid_predictions']}, "
          f"duplicates {un['duplicate_predictions']}")
    print(f"report: {files[0].rsplit('/', 1)[0]}")


def main(argv: list[str] | None = None) -> int:
    """Run the audit; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        outcome = run_audit(config_from_args(args))
    except AuditError as error:
        print(f"audit: error: {public_text(str(error))}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        print(f"audit: error: {public_text(str(error))}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except ValueError as error:  # malformed data the readers did not anticipate
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"audit: error: bad input: {public_text(first)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    _print_summary(outcome.metrics, outcome.files)
    for uri in outcome.files:
        if uri.endswith("/thresholds.json"):
            print(f"calibrated thresholds (precision {args.calibrate_precision}): {uri}")
    if outcome.metrics["num_images"] == 0:
        print("audit: warning: no labels row matched a ground-truth image; check the ids and "
              "file names (see unmatched.tsv, --image-suffix, --mask-suffix)", file=sys.stderr)
    if outcome.exit_code:
        print(f"audit: mIoU {outcome.metrics['mIoU']} is below --fail-under {args.fail_under}",
              file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
