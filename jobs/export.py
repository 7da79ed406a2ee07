"""Export a labeling output for training: PNG label maps, a Hugging Face dataset, or COCO JSON.

    python jobs/export.py --labels OUTPUT --format png|hf|coco --out DIR
        [--ignore-below T | --thresholds thresholds.json]

``png``: ``DIR/<shard_id>/<key>.png`` (class index in vocabulary order, 255 = ignore),
``classes.txt``, ``id2label.json``. ``hf``: Parquet under ``DIR/data/`` with ``image`` and
``label`` Image features and ``id2label.json`` (``datasets.load_dataset(DIR)``). ``coco``:
``DIR/annotations.json`` as ``jobs/export_coco.py`` writes it. Every format writes
``DIR/export.json`` (counts, error rows, skipped rows, thresholds, provenance). Pixels whose
confidence is below the threshold of their class become 255 (png, hf).

Exit status: 0 done (error rows are listed, not fatal), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jobs.help_text import field_defaults
from pipeline.config import storage_options_argument
from pipeline.exports import (
    EXPORT_FORMATS,
    ExportError,
    ExportOptions,
    ExportSummary,
    export_hf,
    export_png,
    prepare,
    write_side_files,
)
from schemas.confidence import resolve_levels
from schemas.io import iter_label_rows, open_uri
from schemas.uris import public_text, public_uri

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line; optional flags default to None (help texts state the defaults)."""
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    parser.add_argument("--labels", required=True, help="labeling output URI (has run.json)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="png: DIR/<image_id>.png label maps (class index, 255 = ignore) "
                        "with classes.txt and id2label.json; hf: a datasets folder "
                        "(DIR/data/train-<shard>.parquet: image, label, confidence); coco: "
                        "DIR/annotations.json with the RLE masks")
    parser.add_argument("--out", required=True, help="export directory (new or empty; any URI)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ignore-below", type=float, metavar="T",
                       help="pixels whose confidence is below T become 255 (png, hf; "
                       "default: none, every pixel keeps its class)")
    group.add_argument("--thresholds", metavar="FILE",
                       help="per-class thresholds (thresholds.json of jobs/audit.py "
                       "--calibrate-precision; default: none)")
    parser.add_argument("--storage-options", type=storage_options_argument,
                        metavar="JSON|@FILE", help="fsspec options for every URI: a JSON "
                        "object, or @FILE naming a file that holds one (default: "
                        f"{field_defaults(ExportOptions)['storage_options']})")
    parser.add_argument("--no-progress", action="store_true", default=None,
                        help="no progress line (default: a progress line on stderr)")
    return parser


def _thresholds(uri: str | None, storage_options: dict) -> dict | None:
    if uri is None:
        return None
    fs, path = open_uri(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"--thresholds {uri} is not valid JSON: {exc}") from None


def run(args: argparse.Namespace) -> ExportSummary:
    """Run one export (raises ExportError/OSError/ValueError on bad input)."""
    options = dict(args.storage_options or {})
    progress = None if args.no_progress else sys.stderr
    if args.format == "coco":
        if args.ignore_below is not None or args.thresholds:
            raise ExportError("--ignore-below/--thresholds apply to png and hf exports")
        return _coco(args.labels, args.out, ExportOptions(storage_options=options,
                                                          progress=progress))
    thresholds = _thresholds(args.thresholds, options)
    probe = prepare(args.labels, args.out, ExportOptions(storage_options=options))
    names = [c.name for c in probe["categories"]]
    levels = resolve_levels(names, args.ignore_below, thresholds)
    applied = ({"ignore_below": args.ignore_below} if args.ignore_below is not None
               else {"file": public_uri(args.thresholds), "document": thresholds}
               if thresholds else None)
    export = export_png if args.format == "png" else export_hf
    return export(args.labels, args.out, ExportOptions(levels, applied, options, progress))


def _coco(labels: str, out: str, options: ExportOptions) -> ExportSummary:
    from jobs.export_coco import export as export_coco

    provenance = prepare(labels, out, options)
    target = f"{out.rstrip('/')}/annotations.json"
    counts = export_coco(labels, target, dict(options.storage_options))
    summary = ExportSummary("coco", out, written=counts["images"])
    for row in iter_label_rows(labels, options.storage_options,
                               columns=["image_id", "status", "error"]):
        if row["status"] != "ok":
            summary.error_rows.append((row["image_id"], f"{row['status']}: {row['error']}"))
    fs, root = open_uri(out, options.storage_options)
    write_side_files(fs, root, provenance, summary, options, classes_txt=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ExportError, OSError, ValueError, KeyError) as exc:
        print(f"export.py: error: {public_text(str(exc))}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
