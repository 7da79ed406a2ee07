"""Reading the pipeline's labels (``OUTPUT/labels/*.parquet`` + ``OUTPUT/run.json``) via schemas."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from schemas.io import (
    LABELS_SUFFIX,
    iter_label_rows,
    list_label_files,
    read_label_table,
    read_run_record,
    record_categories,
)
from schemas.labels import STATUS_OK, Category
from schemas.masks import annotations_to_label_map

from .errors import AuditError
from .sources import name_aliases


@dataclass(frozen=True)
class LabelsSource:
    """An opened labels output.

    Attributes:
        uri: the output root.
        categories: its categories (class ``i`` has ``categories[i]``).
        vocabulary_hash: from the run record or file metadata, if present.
        files: completed label files (paths within the output filesystem).
        incomplete_shards: shard ids with labels objects but no completion record (not read);
            losing or late attempts of completed shards are not counted.
        storage_options: fsspec options.
    """

    uri: str
    categories: list[Category]
    vocabulary_hash: str | None
    files: list[str]
    incomplete_shards: list[str]
    storage_options: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[list[str]]:
        """Per class its names, display name first."""
        return [[c.name, *[s for s in c.synonyms if s != c.name]] for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        return [c.id for c in self.categories]


def open_labels(uri: str, storage_options: Mapping | None = None) -> LabelsSource:
    """Open a labels output: its run record (or, lacking one, file metadata) and file list.

    Raises:
        AuditError: no label files, or no categories anywhere.
    """
    options = dict(storage_options or {})
    try:
        files = list_label_files(uri, options, completed_only=True)
        every = list_label_files(uri, options, completed_only=False)
    except (OSError, ValueError) as error:
        raise AuditError(f"cannot list labels under {uri}: {error}") from None
    if not files:
        detail = f" ({len(every)} without a completion record)" if every else ""
        raise AuditError(f"no completed label files under {uri.rstrip('/')}/labels{detail}; "
                         "is this the pipeline's output folder?")
    incomplete = _incomplete_shards(uri, options, every)
    categories, vocab_hash = _categories(uri, options, files[0])
    return LabelsSource(uri, categories, vocab_hash, files, incomplete, options)


_ATTEMPT = re.compile(r"\.[^.]+-\d+$")  # ".<run_id>-<attempt>" of a fenced labels object


def _incomplete_shards(uri: str, options: dict, every: list[str]) -> list[str]:
    """Shard ids that have labels objects but no completion record.

    Under the fenced contract a shard's objects are ``labels/<shard>.<run>-<n>.parquet`` and
    only the one its ``_done/<shard>.json`` names is read; the others (attempts that lost the
    race, a zombie's late write) belong to a completed shard and are normal.
    """
    from schemas.completion import read_records
    from schemas.io import open_uri

    fs, root = open_uri(uri, options)
    try:
        done = set(read_records(fs, root))
    except OSError as error:
        raise AuditError(f"cannot read the completion records of {uri}: {error}") from None
    shards = set()
    for path in every:
        base = posixpath.basename(path).removesuffix(LABELS_SUFFIX)
        owner = next((sid for sid in done if base == sid or (
            base.startswith(f"{sid}.") and _ATTEMPT.fullmatch(base[len(sid):]))), None)
        if owner is None:
            shards.add(_ATTEMPT.sub("", base))
    return sorted(shards)


def _categories(uri: str, options: dict, first_file: str) -> tuple[list[Category], str | None]:
    try:
        record = read_run_record(uri, options)
    except FileNotFoundError:
        record = None
    except ValueError as error:
        raise AuditError(f"run record of {uri} is not valid JSON: {error}") from None
    if record and record.get("categories"):
        return record_categories(record), record.get("vocabulary_hash")
    from schemas.io import open_uri

    fs, _ = open_uri(uri, options)
    _, meta = read_label_table(first_file, filesystem=fs, columns=["image_id"])
    if not meta["categories"]:
        raise AuditError(f"labels {uri} have no categories (no run.json, no file metadata)")
    return meta["categories"], meta["vocabulary_hash"]


def iter_rows(source: LabelsSource) -> Iterator[dict]:
    """Stream every row of the completed label files (bounded memory)."""
    return iter_label_rows(source.uri, source.storage_options)


def is_ok(row: Mapping) -> bool:
    return row.get("status") == STATUS_OK


def row_aliases(row: Mapping) -> list[str]:
    """Names to match a row to a ground-truth image: its id, then its key's forms."""
    image_id, key = str(row.get("image_id") or ""), str(row.get("key") or "")
    return list(dict.fromkeys([image_id, *name_aliases(key), *name_aliases(image_id)]))


def row_label_map(row: Mapping, source: LabelsSource) -> np.ndarray:
    """``[H, W]`` int64 class indices of an ``ok`` row.

    Raises:
        ValueError: masks overlap, leave pixels uncovered, or have the wrong size.
    """
    return annotations_to_label_map(row.get("annotations") or [], int(row["height"]),
                                    int(row["width"]), source.category_ids)


def row_presence(row: Mapping) -> np.ndarray | None:
    presence = row.get("presence")
    return None if presence is None else np.asarray(presence, dtype=np.float64)


def row_class_scores(row: Mapping, source: LabelsSource) -> np.ndarray:
    """``[K]`` annotation score per class (NaN for classes without an annotation)."""
    index = {cid: i for i, cid in enumerate(source.category_ids)}
    scores = np.full(len(index), np.nan)
    for ann in row.get("annotations") or []:
        i = index.get(int(ann["category_id"]))
        if i is not None:
            scores[i] = float(ann["score"])
    return scores
