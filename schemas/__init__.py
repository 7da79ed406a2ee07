"""The output contract as code: label table schema, mask/RLE helpers, COCO export, readers.

Pure pyarrow / numpy / pycocotools (fsspec only inside :mod:`schemas.io` functions, Pillow in
:mod:`schemas.confidence`); never imports torch or ray.
"""

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
from .masks import annotations_to_label_map, label_map_to_annotations, mask_to_rle, rle_to_mask

__all__ = [
    "ERROR_STATUSES", "SCHEMA_VERSION", "STATUS_OK", "Category", "RowError",
    "annotations_to_label_map", "categories_from_classes", "coco_dict", "error_row",
    "label_map_to_annotations", "label_schema", "make_image_id", "make_row", "mask_to_rle",
    "parse_run_metadata", "rle_to_mask", "rows_to_table", "run_metadata", "validate_row",
    "with_run_metadata", "write_coco_json",
]
