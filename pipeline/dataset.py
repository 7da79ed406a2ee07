"""A torch-free dataset reader over a labeling output, for training loops.

``LabelDataset(OUTPUT)`` iterates ``(image [H, W, 3] uint8, label [H, W] uint8, confidence
[H, W] float32)`` per ok row: the source image exactly as the engine saw it, the class index
in vocabulary order with 255 = ignore (``ignore_below`` or ``thresholds``), and the stored
confidence (NaN everywhere when the labels have none). It streams label files and source
shards from any fsspec store, one image at a time.

Sharding: a torch ``DataLoader`` with ``num_workers`` workers on ``world_size`` ranks has
``num_workers x world_size`` consumers; consumer ``c = rank * num_workers + worker`` reads the
label files ``f`` with ``f % consumers == c`` when there are at least as many files as
consumers, else the rows ``i`` (in output order) with ``i % consumers == c``; either way every
row is read exactly once per epoch. ``rank``/``world_size`` default to the ``RANK`` and
``WORLD_SIZE`` environment variables; the worker comes from
``torch.utils.data.get_worker_info()`` when torch is loaded (this module never imports it).
Error rows and rows whose image cannot be read are skipped and counted in ``skipped``.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from schemas.confidence import apply_ignore, decode_confidence, quantize, resolve_levels
from schemas.io import output_provenance, read_run_record
from schemas.labels import STATUS_OK
from schemas.masks import annotations_to_label_map

from .source_images import SourceJoin, label_files

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


def _worker() -> tuple[int, int]:
    torch = sys.modules.get("torch")
    if torch is None:
        return 0, 1
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class LabelDataset:
    """Iterable ``(image, label, confidence)`` samples of a labeling output.

    Usable directly or as ``torch.utils.data.IterableDataset`` (see README, "Exports and
    training"): it only needs ``__iter__``.

    Args:
        labels_uri: the output (``labels/`` + ``run.json``), any fsspec URI.
        ignore_below: confidence threshold below which pixels become 255.
        thresholds: per-class thresholds instead: a ``thresholds.json`` document or its URI.
        rank, world_size: this process's rank (default ``$RANK``/``$WORLD_SIZE`` or 0/1).
        storage_options: fsspec options for labels and sources.
        with_ids: yield ``(image, label, confidence, image_id)`` instead.

    Raises:
        ValueError: ``ignore_below``/``thresholds`` on an output without stored confidence.
    """

    def __init__(self, labels_uri: str, *, ignore_below: float | None = None,
                 thresholds: Mapping | str | None = None, rank: int | None = None,
                 world_size: int | None = None, storage_options: Mapping | None = None,
                 with_ids: bool = False) -> None:
        self.labels_uri = labels_uri
        self.storage_options = dict(storage_options or {})
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = (int(os.environ.get("WORLD_SIZE", 1)) if world_size is None
                           else world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        self.with_ids = with_ids
        self._fs, self.files = label_files(labels_uri, self.storage_options)
        if self.files:
            provenance = output_provenance(labels_uri, self.storage_options)
            self.class_names = [c.name for c in provenance["categories"]]
        else:
            self.class_names = []
        self.id2label = dict(enumerate(self.class_names))
        if isinstance(thresholds, str):
            thresholds = _read_json(thresholds, self.storage_options)
        self.class_levels = resolve_levels(self.class_names, ignore_below, thresholds)
        try:
            io = read_run_record(labels_uri, self.storage_options).get("io") or {}
        except FileNotFoundError:
            io = {}
        self._io = io
        if self.class_levels is not None and self.files and not self._has_confidence():
            raise ValueError(f"labels {labels_uri} have no stored confidence (labelled without "
                             "--confidence or schema 1.0); ignore_below/thresholds need it")
        self.skipped: list[tuple[str, str]] = []

    def _has_confidence(self) -> bool:
        """False when the output certainly stores no confidence: ``run.json`` says it was
        labelled without it, or (lacking that) the first label file has no such column."""
        if "confidence" in self._io:
            return bool(self._io["confidence"])
        import pyarrow.parquet as pq

        with self._fs.open(self.files[0], "rb") as f:
            return "confidence" in pq.ParquetFile(f).schema_arrow.names

    def consumer(self) -> tuple[int, int]:
        """``(index, count)`` of this reader among all workers of all ranks."""
        worker, workers = _worker()
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Sample] | Iterator[tuple]:
        self.skipped = []
        index, count = self.consumer()
        by_file = len(self.files) >= count
        join = SourceJoin(self._io, self.storage_options)
        counter = itertools.count()

        def mine(row: dict) -> bool:  # called for every row, in output order
            return next(counter) % count == index

        for f, path in enumerate(self.files):
            if by_file and f % count != index:
                continue
            for item in join.items(self._fs, path, ["annotations", "confidence"],
                                   None if by_file else mine):
                sample = self._sample(item)
                if sample is not None:
                    yield sample

    def _sample(self, item: Any) -> Sample | tuple | None:
        row = item.row
        if row["status"] != STATUS_OK:
            self.skipped.append((row["image_id"], f"{row['status']}: {row['error']}"))
            return None
        if item.error is not None:
            self.skipped.append((row["image_id"], item.error))
            return None
        height, width = int(row["height"]), int(row["width"])
        labels = annotations_to_label_map(row["annotations"] or [], height, width)
        label = labels.astype(np.uint8)
        if row.get("confidence") is not None:
            confidence = decode_confidence(row["confidence"], height, width)
        else:
            confidence = np.full((height, width), np.nan, dtype=np.float32)
        if self.class_levels is not None:
            if row.get("confidence") is None:
                self.skipped.append((row["image_id"], "no confidence stored; thresholds "
                                     "need labels made with --confidence"))
                return None
            label = apply_ignore(label, quantize(confidence), self.class_levels)
        sample = (item.rgb, label, confidence)
        return (*sample, row["image_id"]) if self.with_ids else sample


def _read_json(uri: str, storage_options: Mapping) -> dict:
    import json

    from schemas.io import open_uri

    from .storage import read_bytes

    fs, path = open_uri(uri, storage_options)
    return json.loads(read_bytes(fs, path).decode("utf-8"))
