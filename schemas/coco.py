"""Label rows -> COCO JSON (instances format with RLE masks), loadable by pycocotools' ``COCO()``.

Only ``ok`` rows become COCO images. COCO image ids are integers assigned in row order from 1;
the pipeline's string id is kept as ``cass_image_id``. Annotations carry ``iscrowd: 0``, the
compressed RLE ``segmentation`` (counts as str), ``area``, ``bbox`` [x, y, w, h] in pixels and
the ``score`` (mean class probability inside the mask).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

from .labels import STATUS_OK, Category


def coco_categories(categories: Sequence[Category]) -> list[dict]:
    """COCO ``categories`` entries (``synonyms`` kept as an extra field)."""
    return [
        {"id": c.id, "name": c.name, "supercategory": "", "synonyms": list(c.synonyms)}
        for c in categories
    ]


def coco_dict(
    rows: Iterable[Mapping],
    categories: Sequence[Category],
    info: Mapping | None = None,
) -> dict:
    """Build the whole COCO dict in memory (for small outputs and tests).

    Args:
        rows: label rows (dicts in the :func:`schemas.labels.label_schema` layout).
        categories: the output's categories.
        info: optional COCO ``info`` block.
    """
    images, annotations = [], []
    for image, anns in _coco_records(rows):
        images.append(image)
        annotations.extend(anns)
    return {
        "info": dict(info or {}),
        "categories": coco_categories(categories),
        "images": images,
        "annotations": annotations,
    }


def write_coco_json(
    rows: Iterable[Mapping],
    categories: Sequence[Category],
    fp: IO[str],
    info: Mapping | None = None,
) -> dict:
    """Stream COCO JSON to a text file without holding all rows in memory.

    Annotations are spooled to a temporary file while images are written, then appended.

    Returns:
        Counts: ``{"images": n, "annotations": m}``.
    """
    fp.write('{"info": ' + json.dumps(dict(info or {})))
    fp.write(', "categories": ' + json.dumps(coco_categories(categories)))
    fp.write(', "images": [')
    num_images = num_anns = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        for image, anns in _coco_records(rows):
            fp.write(("," if num_images else "") + json.dumps(image))
            for ann in anns:
                spool.write(("," if num_anns else "") + json.dumps(ann))
                num_anns += 1
            num_images += 1
        fp.write('], "annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, fp)
    fp.write("]}")
    return {"images": num_images, "annotations": num_anns}


def _coco_records(rows: Iterable[Mapping]) -> Iterable[tuple[dict, list[dict]]]:
    """Yield ``(image, annotations)`` per ok row, numbering images and annotations from 1."""
    image_id = ann_id = 0
    for row in rows:
        if row["status"] != STATUS_OK:
            continue
        image_id += 1
        image = {
            "id": image_id, "file_name": row["key"], "width": int(row["width"]),
            "height": int(row["height"]), "cass_image_id": row["image_id"],
            "source_uri": row["source_uri"],
        }
        anns = []
        for ann in row["annotations"] or []:
            ann_id += 1
            anns.append(_coco_annotation(ann, ann_id, image_id))
        yield image, anns


def _coco_annotation(ann: Mapping, ann_id: int, image_id: int) -> dict:
    seg = ann["segmentation"]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(ann["category_id"]),
        "segmentation": {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]},
        "area": int(ann["area"]),
        "bbox": [float(v) for v in ann["bbox"]],
        "iscrowd": 0,
        "score": float(ann["score"]),
    }
