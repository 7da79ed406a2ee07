"""Label Studio tasks with the pseudo-labels as predictions, and the matching labeling config.

One task per selected image::

    {"data": {"image": URL or data URI, "cass_image_id": ..., "cass_source_uri": ...,
              "cass_key": ..., "cass_rank": 1, "cass_review_score": 0.42},
     "predictions": [{"model_version": "cass-labeler <vocabulary hash>", "score": 0.58,
                      "result": [{"id": "cass-3", "type": "brushlabels",
                                  "from_name": "label", "to_name": "image",
                                  "original_width": W, "original_height": H,
                                  "image_rotation": 0, "score": 0.71,
                                  "value": {"format": "rle", "rle": [...],
                                            "brushlabels": ["cat"]}}, ...]}]}

``model_version`` ends in ``random-weights-<seed>`` when the labels came from random weights.
The prediction ``score`` is the image's area-weighted mean mask score (Label Studio's
"prediction score" ordering then shows the least certain first); each region carries its own
mask score. Masks are the labels' COCO RLE re-encoded as brush RLE (:mod:`.brush`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from xml.sax.saxutils import quoteattr

from schemas.labels import Category
from schemas.masks import rle_to_mask

from .brush import encode_brush
from .ranking import Ranked, mean_mask_score, presence_entropy

FROM_NAME = "label"
TO_NAME = "image"
DATA_KEY = "image"
ID_KEY = "cass_image_id"


def labeling_config(categories: Sequence[Category], colors: Sequence[str] | None = None) -> str:
    """The labeling config XML: an ``Image`` and ``BrushLabels`` with one ``Label`` per class.

    Names are XML-escaped attribute values; Label Studio matches them verbatim against the
    ``brushlabels`` of results.
    """
    lines = ["<View>",
             f'  <Image name="{TO_NAME}" value="${DATA_KEY}" zoom="true" zoomControl="true"/>',
             f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">']
    for i, cat in enumerate(categories):
        color = f" background={quoteattr(colors[i])}" if colors else ""
        lines.append(f"    <Label value={quoteattr(cat.name)}{color}/>")
    lines += ["  </BrushLabels>", "</View>", ""]
    return "\n".join(lines)


def brush_results(row: Mapping, names: Mapping[int, str]) -> list[dict]:
    """One brush region per annotation of a labels row (category id -> class name)."""
    height, width = int(row["height"]), int(row["width"])
    out = []
    for ann in row.get("annotations") or []:
        cid = int(ann["category_id"])
        mask = rle_to_mask(ann["segmentation"])
        out.append({
            "id": f"cass-{cid}", "type": "brushlabels", "from_name": FROM_NAME,
            "to_name": TO_NAME, "original_width": width, "original_height": height,
            "image_rotation": 0, "score": round(float(ann["score"]), 6),
            "value": {"format": "rle", "rle": encode_brush(mask),
                      "brushlabels": [names.get(cid, str(cid))]},
        })
    return out


def build_task(item: Ranked, rank: int, image_ref: str, categories: Sequence[Category],
               model_version: str) -> dict:
    """The Label Studio task of one selected image.

    Args:
        item: the ranked row.
        rank: 1-based position in the review order.
        image_ref: what Label Studio loads (cloud URL or ``data:`` URI).
        categories: the output's categories.
        model_version: recorded on the prediction.
    """
    row = item.row
    names = {c.id: c.name for c in categories}
    data = {DATA_KEY: image_ref, ID_KEY: item.image_id,
            "cass_source_uri": str(row.get("source_uri")), "cass_key": str(row.get("key")),
            "cass_rank": rank, "cass_review_score": round(item.score, 6),
            "cass_presence_entropy": round(presence_entropy(row), 6)}
    prediction = {"model_version": model_version,
                  "score": round(mean_mask_score(row), 6),
                  "result": brush_results(row, names)}
    return {"data": data, "predictions": [prediction]}
