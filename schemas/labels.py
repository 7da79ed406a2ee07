"""The label table: one row per image, versioned Arrow schema, validating row builders.

Every output Parquet file (``OUTPUT/labels/<shard_id>.<run_id>-<n>.parquet``) has this schema. Its
file metadata carries, as JSON under ``b"cass.run"``, the categories, the vocabulary hash and
run information (engine config, model identities), so one file is self-describing.

Versions: 1.1 adds the nullable ``confidence`` column (:mod:`schemas.confidence`); readers
accept 1.0 files, whose rows read back with ``confidence`` None.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = "1.1"
#: Versions readers accept: 1.0 files have no ``confidence`` column (read back as null).
READABLE_VERSIONS = ("1.0", "1.1")

#: Schema-level metadata key holding :data:`SCHEMA_VERSION`.
VERSION_KEY = b"cass.schema_version"
#: Schema-level metadata key holding the run JSON (categories, vocabulary hash, run info).
RUN_KEY = b"cass.run"

STATUS_OK = "ok"
#: Error kinds of a failed image (``status`` column).
ERROR_STATUSES = (
    "decode_error",   # not an image, corrupt or truncated data
    "too_large",      # more pixels than the decompression-bomb limit
    "empty",          # zero-byte object
    "read_error",     # the bytes could not be read from storage
    "engine_error",   # the engine failed on this image
)
STATUSES = (STATUS_OK, *ERROR_STATUSES)


class RowError(ValueError):
    """A row does not satisfy the label schema."""


@dataclass(frozen=True)
class Category:
    """One output category.

    Attributes:
        id: COCO category id (``class_index + 1``; 0 is reserved).
        name: display name (the vocabulary line's ``[name]`` if it has one, else the
            class's first synonym): ``background`` for VOC21's and COCO-Object's class 0.
        synonyms: every text query of the class, first one included.
    """

    id: int
    name: str
    synonyms: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "synonyms": list(self.synonyms)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Category:
        return cls(int(data["id"]), str(data["name"]), tuple(data.get("synonyms", ())))


def categories_from_classes(classes: Sequence[Sequence[str]],
                            names: Sequence[str | None] | None = None) -> list[Category]:
    """Categories for a vocabulary's classes (one tuple of synonyms per class, in order).

    Args:
        classes: per class its text queries.
        names: per class its display name (a vocabulary line's ``[name]``), or None/absent
            for the first query.
    """
    shown = list(names or [])
    return [
        Category(index + 1, (shown[index] if index < len(shown) and shown[index] else
                             queries[0]).strip(), tuple(n.strip() for n in queries))
        for index, queries in enumerate(classes)
    ]


def vocabulary_line(category: Category) -> str:
    """The vocabulary line that gives ``category`` back, queries in their order:
    ``[name] query, ...`` unless the display name is the first query."""
    if not category.synonyms:
        return category.name
    if category.name == category.synonyms[0]:
        return ", ".join(category.synonyms)
    return f"[{category.name}] " + ", ".join(category.synonyms)


def _meta(**items: str) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in items.items()}


def _rle_type() -> pa.DataType:
    return pa.struct([
        pa.field("size", pa.list_(pa.int32()), nullable=False,
                 metadata=_meta(description="[height, width] of the mask in pixels")),
        pa.field("counts", pa.string(), nullable=False,
                 metadata=_meta(description="COCO compressed RLE counts (column-major)")),
    ])


def _annotation_type() -> pa.DataType:
    return pa.struct([
        pa.field("category_id", pa.int32(), nullable=False,
                 metadata=_meta(description="category id = class index + 1")),
        pa.field("segmentation", _rle_type(), nullable=False,
                 metadata=_meta(description="binary mask as COCO compressed RLE")),
        pa.field("area", pa.int64(), nullable=False, metadata=_meta(unit="pixels")),
        pa.field("bbox", pa.list_(pa.float64()), nullable=False,
                 metadata=_meta(unit="pixels", convention="[x, y, w, h], x/y of top-left")),
        pa.field("score", pa.float32(), nullable=False,
                 metadata=_meta(description="mean class probability inside the mask",
                                range="[0, 1]")),
    ])


def label_schema() -> pa.Schema:
    """The Arrow schema of the label table (version :data:`SCHEMA_VERSION`)."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False,
                 metadata=_meta(description="unique id: <shard_id>/<key>")),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False,
                 metadata=_meta(description="URI of the input object or shard")),
        pa.field("key", pa.string(), nullable=False,
                 metadata=_meta(description="image key or file name within its shard")),
        pa.field("width", pa.int32(), metadata=_meta(unit="pixels", note="null if undecoded")),
        pa.field("height", pa.int32(), metadata=_meta(unit="pixels", note="null if undecoded")),
        pa.field("status", pa.string(), nullable=False,
                 metadata=_meta(values=",".join(STATUSES))),
        pa.field("error", pa.string(), metadata=_meta(description="message; null when ok")),
        pa.field("annotations", pa.list_(_annotation_type()),
                 metadata=_meta(description="one per class present; masks tile the image")),
        pa.field("presence", pa.list_(pa.float32()),
                 metadata=_meta(description="object-presence probability per category, "
                                "in category order", range="[0, 1]")),
        pa.field("confidence", pa.binary(),
                 metadata=_meta(description="per-pixel probability of the pixel's label: "
                                "8-bit PNG of round(255 * p) (see schemas.confidence)",
                                since="1.1", note="null on error rows and when not stored")),
    ]
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode()})


def make_image_id(shard_id: str, key: str) -> str:
    """The ``image_id`` of an image: ``<shard_id>/<key>``."""
    return f"{shard_id}/{key}"


def make_row(
    *,
    shard_id: str,
    source_uri: str,
    key: str,
    width: int,
    height: int,
    annotations: Sequence[Mapping],
    presence: Sequence[float],
    num_categories: int | None = None,
    image_id: str | None = None,
    confidence: bytes | None = None,
) -> dict:
    """A validated ``ok`` row.

    Args:
        shard_id, source_uri, key: where the image came from.
        width, height: image size in pixels (after EXIF orientation).
        annotations: from :func:`schemas.masks.label_map_to_annotations`.
        presence: ``[C]`` object-presence probabilities in category order.
        num_categories: when given, checks ``len(presence)`` and category ids.
        image_id: default :func:`make_image_id`.
        confidence: the confidence map as from :func:`schemas.confidence.encode_confidence`.

    Raises:
        RowError: the row breaks the schema's conventions.
    """
    row = {
        "image_id": image_id or make_image_id(shard_id, key),
        "shard_id": shard_id, "source_uri": source_uri, "key": key,
        "width": int(width), "height": int(height), "status": STATUS_OK, "error": None,
        "annotations": [dict(a) for a in annotations],
        "presence": [float(p) for p in presence],
        "confidence": None if confidence is None else bytes(confidence),
    }
    validate_row(row, num_categories)
    return row


def error_row(
    *,
    shard_id: str,
    source_uri: str,
    key: str,
    status: str,
    error: str,
    width: int | None = None,
    height: int | None = None,
    image_id: str | None = None,
) -> dict:
    """A validated error row (no annotations, no presence).

    Raises:
        RowError: unknown error status or empty message.
    """
    _require(status in ERROR_STATUSES,
             f"error status {status!r} is not one of {', '.join(ERROR_STATUSES)}")
    row = {
        "image_id": image_id or make_image_id(shard_id, key),
        "shard_id": shard_id, "source_uri": source_uri, "key": key,
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "status": status, "error": error, "annotations": None, "presence": None,
        "confidence": None,
    }
    validate_row(row)
    return row


def validate_row(row: Mapping, num_categories: int | None = None) -> None:
    """Check a row against the schema and its conventions.

    Raises:
        RowError: with the first problem found.
    """
    for name in ("image_id", "shard_id", "source_uri", "key", "status"):
        _require(isinstance(row.get(name), str) and row[name] != "", f"{name} must be a str")
    if row["status"] == STATUS_OK:
        _validate_ok(row, num_categories)
    else:
        _require(row["status"] in ERROR_STATUSES,
                 f"status {row['status']!r} is not one of {', '.join(STATUSES)}")
        _require(isinstance(row.get("error"), str) and row["error"] != "",
                 "an error row needs an error message")
        _require(not row.get("annotations"), "an error row has no annotations")
        _require(row.get("confidence") is None, "an error row has no confidence")


def _validate_ok(row: Mapping, num_categories: int | None) -> None:
    width, height = row.get("width"), row.get("height")
    _require(_is_int(width) and width > 0, "width must be a positive int")
    _require(_is_int(height) and height > 0, "height must be a positive int")
    _require(row.get("error") is None, "an ok row has error = None")
    presence = row.get("presence")
    _require(presence is not None, "an ok row needs presence scores")
    _require(row.get("confidence") is None or isinstance(row["confidence"], bytes),
             "confidence must be PNG bytes or None")
    if num_categories is not None:
        _require(len(presence) == num_categories,
                 f"presence has {len(presence)} values, expected {num_categories}")
    _require(all(_unit(p) for p in presence), "presence values must be in [0, 1]")
    annotations = row.get("annotations") or []
    _require(len(annotations) > 0, "an ok row needs at least one annotation")
    for ann in annotations:
        _validate_annotation(ann, height, width, num_categories)
    ids = [a["category_id"] for a in annotations]
    _require(len(set(ids)) == len(ids), "one annotation per category")
    total = sum(int(a["area"]) for a in annotations)
    _require(total == width * height, f"mask areas sum to {total}, not {width * height} pixels")


def _validate_annotation(ann: Mapping, height: int, width: int, num_cats: int | None) -> None:
    cid = ann.get("category_id")
    _require(_is_int(cid) and cid >= 1, "category_id must be an int >= 1")
    if num_cats is not None:
        _require(cid <= num_cats, f"category_id {cid} > number of categories {num_cats}")
    seg = ann.get("segmentation") or {}
    _require(list(seg.get("size", [])) == [height, width],
             f"segmentation size {seg.get('size')} != [height, width] {[height, width]}")
    _require(isinstance(seg.get("counts"), str), "segmentation counts must be a str")
    area = ann.get("area")
    _require(_is_int(area) and 0 < area <= height * width, "area out of range")
    bbox = ann.get("bbox")
    _require(bbox is not None and len(bbox) == 4, "bbox must be [x, y, w, h]")
    _require(_unit(ann.get("score")), "score must be in [0, 1]")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _unit(value: object) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return math.isfinite(value) and 0.0 <= value <= 1.0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RowError(message)


def rows_to_table(rows: Sequence[Mapping], run_metadata: Mapping | None = None) -> pa.Table:
    """Build a label table from rows, with optional run metadata (see :func:`run_metadata`)."""
    table = pa.Table.from_pylist(list(rows), schema=label_schema())
    if run_metadata is not None:
        table = table.replace_schema_metadata(with_run_metadata(table.schema, run_metadata))
    return table


def run_metadata(
    categories: Sequence[Category],
    vocabulary_hash: str,
    run_info: Mapping | None = None,
) -> dict:
    """The JSON-able dict stored under :data:`RUN_KEY`."""
    return {
        "schema_version": SCHEMA_VERSION,
        "categories": [c.to_dict() for c in categories],
        "vocabulary_hash": vocabulary_hash,
        "run": dict(run_info or {}),
    }


def with_run_metadata(schema: pa.Schema, metadata: Mapping) -> dict[bytes, bytes]:
    """The schema's metadata plus ``metadata`` as JSON under :data:`RUN_KEY`."""
    out = dict(schema.metadata or {})
    out[VERSION_KEY] = SCHEMA_VERSION.encode()
    out[RUN_KEY] = json.dumps(metadata, sort_keys=True).encode()
    return out


def parse_run_metadata(metadata: Mapping[bytes, bytes] | None) -> dict:
    """Read back :func:`run_metadata` from schema/file metadata.

    Returns:
        ``{"schema_version", "categories": [Category], "vocabulary_hash", "run"}``; missing
        parts are ``None``/empty.
    """
    metadata = metadata or {}
    raw = metadata.get(RUN_KEY)
    data = json.loads(raw) if raw else {}
    version = metadata.get(VERSION_KEY)
    return {
        "schema_version": version.decode() if version else data.get("schema_version"),
        "categories": [Category.from_dict(c) for c in data.get("categories", [])],
        "vocabulary_hash": data.get("vocabulary_hash"),
        "run": data.get("run", {}),
    }
