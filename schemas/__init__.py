"""The output contract as code: label table schema, mask/RLE helpers, COCO export, readers.

Pure pyarrow / numpy / pycocotools (fsspec only inside :mod:`schemas.io` functions, Pillow in
:mod:`schemas.confidence`); never imports torch or ray. The public names below are imported on
first use, so that :mod:`schemas.uris` (standard library only) is light enough for every layer,
the engine included.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "coco_dict": "coco", "write_coco_json": "coco",
    **{name: "labels" for name in (
        "ERROR_STATUSES", "SCHEMA_VERSION", "STATUS_OK", "Category", "RowError",
        "categories_from_classes", "error_row", "label_schema", "make_image_id", "make_row",
        "parse_run_metadata", "rows_to_table", "run_metadata", "validate_row",
        "with_run_metadata")},
    **{name: "masks" for name in (
        "annotations_to_label_map", "label_map_to_annotations", "mask_to_rle", "rle_to_mask")},
}

__all__ = [
    "ERROR_STATUSES", "SCHEMA_VERSION", "STATUS_OK", "Category", "RowError",
    "annotations_to_label_map", "categories_from_classes", "coco_dict", "error_row",
    "label_map_to_annotations", "label_schema", "make_image_id", "make_row", "mask_to_rle",
    "parse_run_metadata", "rle_to_mask", "rows_to_table", "run_metadata", "validate_row",
    "with_run_metadata", "write_coco_json",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .coco import coco_dict, write_coco_json
    from .labels import (
        ERROR_STATUSES,
        SCHEMA_VERSION,
        STATUS_OK,
        Category,
        RowError,
        categories_from_classes,
        error_row,
        label_schema,
        make_image_id,
        make_row,
        parse_run_metadata,
        rows_to_table,
        run_metadata,
        validate_row,
        with_run_metadata,
    )
    from .masks import (
        annotations_to_label_map,
        label_map_to_annotations,
        mask_to_rle,
        rle_to_mask,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
