"""Ground truth in our own label schema (an output folder written through ``schemas``).

Every ``ok`` row is a ground-truth image keyed by its ``image_id`` (also matched by its
``key``); rows with an error status are not ground truth and are counted as such. Label maps
are decoded on demand; one row group is cached, so reading in shard order touches each row
group once.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow.parquet as pq

from schemas.io import open_uri

from .categories import GtCategory
from .errors import AuditError
from .gt_base import GroundTruth, GtImage
from .predictions import is_ok, open_labels, row_label_map
from .sources import name_aliases

_INDEX_COLUMNS = ["image_id", "key", "status"]
_LOAD_COLUMNS = ["annotations", "height", "width", "source_uri"]


class ParquetGroundTruth(GroundTruth):
    """Ground truth from a labels output folder.

    Args:
        uri: the output root (with ``labels/`` and ``run.json``).
        storage_options: fsspec options.
    """

    def __init__(self, uri: str, storage_options: Mapping | None = None) -> None:
        super().__init__()
        self.source = open_labels(uri, storage_options)
        self._fs, _ = open_uri(uri, self.source.storage_options)
        self.categories = [GtCategory(c.name, tuple(s for s in c.synonyms if s != c.name), c.id)
                           for c in self.source.categories]
        self._where: dict[str, tuple[str, int, int]] = {}
        self.not_ok: list[str] = []
        for path in self.source.files:
            self._index_file(path)
        self._cache: tuple[tuple[str, int], list[dict]] | None = None
        self.description = f"labels-schema Parquet {uri} ({len(self._where)} images)"

    def _index_file(self, path: str) -> None:
        with self._fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=_INDEX_COLUMNS).to_pylist()
                for offset, row in enumerate(rows):
                    self._add_row(row, path, group, offset)

    def _add_row(self, row: dict, path: str, group: int, offset: int) -> None:
        if not is_ok(row):
            self.not_ok.append(row["image_id"])
            return
        if row["image_id"] in self._where:
            raise AuditError(f"ground truth {self.source.uri}: duplicate image_id "
                             f"{row['image_id']!r}")
        self._where[row["image_id"]] = (path, group, offset)
        self.index.add(row["image_id"], name_aliases(row["key"]))

    def load(self, key: str) -> GtImage:
        path, group, offset = self._where[key]
        if self._cache is None or self._cache[0] != (path, group):
            with self._fs.open(path, "rb") as f:
                rows = pq.ParquetFile(f).read_row_group(group, columns=_LOAD_COLUMNS).to_pylist()
            self._cache = ((path, group), rows)
        row = self._cache[1][offset]
        try:
            label = row_label_map(row, self.source)
        except ValueError as error:
            raise AuditError(f"ground truth image {key}: {error}") from None
        return GtImage(key, label, row.get("source_uri"))
