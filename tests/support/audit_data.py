"""Tiny labels outputs for the tests, written through ``schemas`` (no engine needed).

The layout is the pipeline's: ``ROOT/labels/<shard>.parquet``, ``ROOT/_done/<shard>.json``,
``ROOT/run.json`` with the categories.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from schemas.io import done_path, labels_path, open_uri, run_record_path
from schemas.labels import (
    categories_from_classes,
    error_row,
    make_row,
    rows_to_table,
    run_metadata,
)
from schemas.masks import label_map_to_annotations


def ok_row(key: str, labels: np.ndarray, num_classes: int, presence: Sequence[float] | None = None,
           shard_id: str = "s0", source_uri: str | None = None,
           scores: Sequence[float] | None = None) -> dict:
    """A validated ``ok`` row for a label map ``[H, W]`` of class indices."""
    h, w = labels.shape
    scores = np.full(num_classes, 0.5) if scores is None else np.asarray(scores)
    anns = label_map_to_annotations(labels, scores)
    presence = [0.5] * num_classes if presence is None else [float(p) for p in presence]
    return make_row(shard_id=shard_id, source_uri=source_uri or f"mem://{shard_id}/{key}",
                    key=key, width=w, height=h, annotations=anns, presence=presence,
                    num_categories=num_classes)


def failed_row(key: str, shard_id: str = "s0", status: str = "decode_error") -> dict:
    """A validated error row."""
    return error_row(shard_id=shard_id, source_uri=f"mem://{shard_id}/{key}", key=key,
                     status=status, error="cannot decode image")


def write_labels_output(uri: str, shards: Mapping[str, Sequence[dict]],
                        classes: Sequence[Sequence[str]], complete: bool = True,
                        storage_options: Mapping | None = None) -> None:
    """Write one label table per shard, completion records and ``run.json``."""
    categories = categories_from_classes(classes)
    meta = run_metadata(categories, "fixture-vocabulary-hash")
    fs, root = open_uri(uri, storage_options)
    for sub in ("labels", "_done"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    for shard_id, rows in shards.items():
        with fs.open(labels_path(root, shard_id), "wb") as f:
            pq.write_table(rows_to_table(list(rows), meta), f)
        if complete:
            with fs.open(done_path(root, shard_id), "wb") as f:
                f.write(json.dumps({"shard_id": shard_id, "rows": len(rows)}).encode())
    record = {"categories": meta["categories"], "vocabulary_hash": meta["vocabulary_hash"]}
    with fs.open(run_record_path(root), "wb") as f:
        f.write(json.dumps(record).encode())
