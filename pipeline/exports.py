"""Training-ready exports of a labeling output: PNG label maps and a Hugging Face dataset.

- ``png``: ``DIR/<image_id>.png`` (``<shard_id>/<key>.png``: keys are unique only within a
  shard) per ok image, single-channel 8-bit, value = class index in vocabulary order,
  255 = ignore; ``DIR/classes.txt`` (the vocabulary format) and ``DIR/id2label.json``. The
  layout mmsegmentation, detectron2's sem_seg and our audit (``--gt-format masks``) read.
- ``hf``: ``DIR/data/train-<shard>.parquet`` with ``image``, ``label`` and ``confidence``
  (8-bit levels ``round(255 * p)``, null without stored confidence) as ``datasets.Image``
  features, and ``image_id``, plus ``DIR/id2label.json``:
  ``datasets.load_dataset(DIR)`` loads it.

Both write ``DIR/export.json``: counts, the error rows and skipped rows with their reasons,
the thresholds applied, and the output's provenance (random weights included). Rows are
streamed one at a time; the output directory must be new or empty.
"""

from __future__ import annotations

import io
import json
import posixpath
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cass_engine.formats import open_image
from schemas.confidence import IGNORE_LABEL, apply_ignore, decode_levels
from schemas.io import (
    categories_document,
    iter_file_rows,
    open_uri,
    output_provenance,
)
from schemas.labels import STATUS_OK, vocabulary_line
from schemas.masks import annotations_to_label_map
from schemas.uris import public_uri

from .progress import ProgressLine
from .source_images import SourceItem, SourceJoin, label_files, run_io
from .storage import is_local

EXPORT_FORMATS = ("png", "hf", "coco")
EXAMPLES = 20
HF_ROW_GROUP = 32


class ExportError(ValueError):
    """Bad input for an export (one line for the user)."""


def safe_relative_path(key: str) -> str:
    """A row key as a relative POSIX path inside the export directory.

    Raises:
        ExportError: absolute, empty, ``..``/``.`` components, NUL or a drive prefix.
    """
    name = key.replace("\\", "/")
    parts = name.split("/")
    if (not name or name.startswith("/") or "\x00" in name or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise ExportError(f"unsafe key {key!r} (absolute, empty or '..' path)")
    return posixpath.join(*parts)


@dataclass
class ExportSummary:
    """What an export wrote and what it could not."""

    format: str
    out: str
    written: int = 0
    error_rows: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored_pixels: int = 0
    pixels: int = 0

    def to_dict(self) -> dict:
        return {"format": self.format, "out": public_uri(self.out), "written": self.written,
                "error_rows": len(self.error_rows), "skipped": len(self.skipped),
                "ignored_pixels": self.ignored_pixels, "pixels": self.pixels,
                "error_row_list": [list(e) for e in self.error_rows],
                "skipped_list": [list(s) for s in self.skipped]}

    def line(self) -> str:
        text = (f"wrote {self.written} images ({self.format}) to {public_uri(self.out)}; "
                f"error rows {len(self.error_rows)}, skipped {len(self.skipped)}")
        if self.pixels:
            text += f"; ignored pixels {100.0 * self.ignored_pixels / self.pixels:.2f}%"
        examples = [f"{i}: {r}" for i, r in (self.error_rows + self.skipped)[:5]]
        return text + "".join(f"\n  {e}" for e in examples)


@dataclass(frozen=True)
class ExportOptions:
    """Options shared by the formats.

    Attributes:
        class_levels: ``[C]`` lowest kept confidence level per class, or None (no ignore).
        thresholds: what was applied, for ``export.json``.
        storage_options: fsspec options for labels, sources and the export.
        progress: stream for the progress line (None: quiet).
    """

    class_levels: np.ndarray | None = None
    thresholds: Mapping | None = None
    storage_options: Mapping = field(default_factory=dict)
    progress: TextIO | None = sys.stderr


def label_png(row: Mapping, class_levels: np.ndarray | None) -> tuple[bytes, np.ndarray]:
    """The export label map of an ok row: ``(PNG bytes, [H, W] uint8)``.

    Raises:
        ExportError: thresholds asked for but the row has no confidence.
        ValueError: masks that do not tile the image.
    """
    height, width = int(row["height"]), int(row["width"])
    labels = annotations_to_label_map(row["annotations"] or [], height, width)
    out = labels.astype(np.uint8)
    if class_levels is not None:
        if row.get("confidence") is None:
            raise ExportError("no confidence stored in this row (schema 1.0 or not labelled "
                              "with confidence); --ignore-below/--thresholds need it")
        out = apply_ignore(out, decode_levels(row["confidence"], height, width), class_levels)
    buffer = io.BytesIO()
    Image.fromarray(out, mode="L").save(buffer, format="PNG")
    return buffer.getvalue(), out


def prepare(labels_uri: str, out_uri: str, options: ExportOptions) -> dict:
    """Check the inputs; returns the provenance (with ``categories``) of the labels.

    Raises:
        ExportError: no labels, too many classes for 8-bit maps, a non-empty output.
    """
    try:
        provenance = output_provenance(labels_uri, options.storage_options)
    except FileNotFoundError:
        raise ExportError(f"no labeling output at {labels_uri} (no run.json, no label "
                          "files)") from None
    num = len(provenance["categories"])
    if num == 0:
        raise ExportError(f"labels {labels_uri} have no categories")
    if num > IGNORE_LABEL:
        raise ExportError(f"{num} classes do not fit 8-bit label maps with 255 = ignore")
    fs, root = open_uri(out_uri, options.storage_options)
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
        raise ExportError(f"export directory {out_uri} exists and is not empty")
    if is_local(fs):
        fs.makedirs(root, exist_ok=True)
    return provenance


def _put(fs: Any, path: str, data: bytes) -> None:
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_side_files(fs: Any, root: str, provenance: Mapping, summary: ExportSummary,
                     options: ExportOptions, classes_txt: bool) -> None:
    """``id2label.json``, ``classes.txt`` (optional) and ``export.json`` of an export."""
    cats = provenance["categories"]
    doc = categories_document({"categories": [c.to_dict() for c in cats],
                               "schema_version": provenance["schema_version"],
                               "vocabulary_hash": provenance["vocabulary_hash"],
                               "identity": {"random_weights": provenance["random_weights"]}})
    _put(fs, f"{root}/id2label.json", json.dumps(doc["id2label"], indent=2).encode())
    if classes_txt:
        lines = [vocabulary_line(c) for c in cats]
        _put(fs, f"{root}/classes.txt", ("\n".join(lines) + "\n").encode())
    meta = {**summary.to_dict(), "ignore_label": IGNORE_LABEL,
            "thresholds": dict(options.thresholds or {}),
            "provenance": {k: v for k, v in provenance.items() if k != "categories"},
            "categories": doc["categories"]}
    _put(fs, f"{root}/export.json", json.dumps(meta, indent=2, default=str).encode())


def _progress(files: list[str], fs: Any, options: ExportOptions, what: str) -> ProgressLine:
    total = 0
    for path in files:
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return ProgressLine(f"export {what}: rows", total, options.progress)


def _account(summary: ExportSummary, row: Mapping, levels: np.ndarray) -> None:
    summary.pixels += levels.size
    summary.ignored_pixels += int((levels == IGNORE_LABEL).sum())


def export_png(labels_uri: str, out_uri: str, options: ExportOptions) -> ExportSummary:
    """Write the ``png`` export (see module docstring)."""
    provenance = prepare(labels_uri, out_uri, options)
    out_fs, root = open_uri(out_uri, options.storage_options)
    summary = ExportSummary("png", out_uri)
    fs, files = label_files(labels_uri, options.storage_options)
    progress = _progress(files, fs, options, "png")
    for path in files:
        for row in iter_file_rows(fs, path, ["image_id", "status", "error", "key", "width",
                                             "height", "annotations", "confidence"]):
            progress.update(1)
            if row["status"] != STATUS_OK:
                summary.error_rows.append((row["image_id"], f"{row['status']}: {row['error']}"))
                continue
            try:
                target = f"{root}/{safe_relative_path(row['image_id'])}.png"
                if out_fs.exists(target):
                    raise ExportError(f"two rows have the image id {row['image_id']!r} (file "
                                      "exists)")
                data, values = label_png(row, options.class_levels)
                _put(out_fs, target, data)
            except (ExportError, ValueError) as exc:
                summary.skipped.append((row["image_id"], str(exc)))
                continue
            except OSError as exc:  # this file only (e.g. a name too long for the filesystem)
                summary.skipped.append((row["image_id"], f"cannot write {target}: "
                                        f"{exc.strerror or type(exc).__name__}"))
                continue
            _account(summary, row, values)
            summary.written += 1
    progress.close()
    write_side_files(out_fs, root, provenance, summary, options, classes_txt=True)
    return summary


def _hf_schema(provenance: Mapping) -> pa.Schema:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"_type": "Image"},
                "confidence": {"_type": "Image"},
                "image_id": {"dtype": "string", "_type": "Value"}}
    meta = {"huggingface": json.dumps({"info": {"features": features}}),
            "cass.provenance": json.dumps({k: v for k, v in provenance.items()
                                           if k != "categories"}, default=str)}
    return pa.schema([("image", image), ("label", image), ("confidence", image),
                      ("image_id", pa.string())], metadata=meta)


def hf_image_bytes(item: SourceItem) -> tuple[bytes, str]:
    """The image as stored in the ``hf`` export: the source bytes when they decode to the same
    pixels without EXIF handling (JPEG/PNG, RGB, no transparency, no rotation), else a PNG of
    the RGB."""
    try:  # header only (the source was decoded, within the pixel limit, by the join)
        with open_image(io.BytesIO(item.data)) as image:
            keep = (image.format in ("JPEG", "PNG") and image.mode == "RGB"
                    and "transparency" not in image.info  # tRNS: composited on white
                    and image.getexif().get(0x0112, 1) == 1)
            fmt = image.format.lower()
    except Exception:  # noqa: BLE001 - re-encode whatever Pillow reads oddly
        keep, fmt = False, "png"
    if keep:
        return item.data, fmt
    buffer = io.BytesIO()
    Image.fromarray(item.rgb).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def export_hf(labels_uri: str, out_uri: str, options: ExportOptions) -> ExportSummary:
    """Write the ``hf`` export (see module docstring)."""
    provenance = prepare(labels_uri, out_uri, options)
    out_fs, root = open_uri(out_uri, options.storage_options)
    summary = ExportSummary("hf", out_uri)
    fs, files = label_files(labels_uri, options.storage_options)
    progress = _progress(files, fs, options, "hf")
    join = SourceJoin(run_io(labels_uri, options.storage_options), options.storage_options)
    schema = _hf_schema(provenance)
    for path in files:
        name = posixpath.basename(path).rsplit(".", 1)[0]
        target = f"{root}/data/train-{name}.parquet"
        if is_local(out_fs):
            out_fs.makedirs(f"{root}/data", exist_ok=True)
        with out_fs.open(target, "wb") as f, pq.ParquetWriter(f, schema) as writer:
            buffer: list[dict] = []
            for item in join.items(fs, path, ["annotations", "confidence"]):
                progress.update(1)
                record = _hf_record(item, options, summary)
                if record is not None:
                    buffer.append(record)
                if len(buffer) >= HF_ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                    buffer = []
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    progress.close()
    write_side_files(out_fs, root, provenance, summary, options, classes_txt=False)
    return summary


def _hf_record(item: SourceItem, options: ExportOptions, summary: ExportSummary) -> dict | None:
    row = item.row
    if row["status"] != STATUS_OK:
        summary.error_rows.append((row["image_id"], f"{row['status']}: {row['error']}"))
        return None
    if item.error is not None:
        summary.skipped.append((row["image_id"], item.error))
        return None
    try:
        label, values = label_png(row, options.class_levels)
    except (ExportError, ValueError) as exc:
        summary.skipped.append((row["image_id"], str(exc)))
        return None
    image, fmt = hf_image_bytes(item)
    base = posixpath.basename(str(row["key"])) or "image"
    _account(summary, row, values)
    summary.written += 1
    confidence = row.get("confidence")
    return {"image": {"bytes": image, "path": f"{base}.{fmt}"},
            "label": {"bytes": label, "path": f"{base}.png"},
            "confidence": (None if confidence is None
                           else {"bytes": confidence, "path": f"{base}.confidence.png"}),
            "image_id": row["image_id"]}
