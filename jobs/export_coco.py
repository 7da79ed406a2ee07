"""Export a labeling output to one COCO JSON file (instances with RLE masks, iscrowd 0).

    python jobs/export_coco.py --labels OUTPUT --out labels.json
    (the same as: python jobs/export.py --labels OUTPUT --format coco --out DIR)

Only ``ok`` rows of completed shards become COCO images; error rows are counted and skipped.
Rows are streamed shard by shard, so memory stays bounded on large outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from pipeline.config import storage_options_argument
from pipeline.storage import is_local
from schemas import write_coco_json
from schemas.io import iter_label_rows, open_uri, output_provenance
from schemas.uris import public_text

COCO_COLUMNS = ("image_id", "source_uri", "key", "width", "height", "status", "annotations")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_coco.py", description=__doc__.split("\n")[0])
    parser.add_argument("--labels", required=True, help="labeling output URI (has run.json)")
    parser.add_argument("--out", required=True, help="COCO JSON file to write (path or URI)")
    parser.add_argument("--storage-options", type=storage_options_argument,
                        metavar="JSON|@FILE",
                        help="fsspec options for the output and --out: a JSON object, or "
                        "@FILE naming a file that holds one (default: {})")
    return parser


def export(labels_uri: str, out_uri: str, storage_options: dict | None = None) -> dict:
    """Write the COCO JSON; returns counts of images and annotations."""
    provenance = output_provenance(labels_uri, storage_options)
    categories = provenance.pop("categories")
    info = {"description": "CASS pseudo-labels", **provenance}
    rows = iter_label_rows(labels_uri, storage_options, columns=COCO_COLUMNS)
    fs, path = open_uri(out_uri, storage_options)
    partial = f"{path}.partial"  # the file appears whole or not at all
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    try:
        with fs.open(partial, "w", encoding="utf-8") as fp:
            counts = write_coco_json(rows, categories, fp, info=info)
        fs.mv(partial, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(partial)
        raise
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = export(args.labels, args.out, args.storage_options)
    except (OSError, ValueError, KeyError) as exc:  # missing/unreadable output, bad run.json
        print(f"export_coco.py: error: {type(exc).__name__}: {public_text(str(exc))}",
              file=sys.stderr)
        return 2
    print(f"wrote {counts['images']} images, {counts['annotations']} annotations "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
