"""Ground truth as a folder (or object-store prefix) of semantic label PNGs plus a class list.

Layout: ``ROOT/**/<name><suffix>`` (suffix ``.png`` by default, e.g. ``_labelTrainIds.png``
for Cityscapes), one single-channel PNG per image whose pixel values are class indices into the
class list; 255 is ignored. The class list is a text file, one class per line (line ``i`` is
value ``i``), synonyms separated by ``", "`` (the vocabulary file format); by default
``ROOT/classes.txt``. ``reduce_zero_label`` applies mmseg's rule (0 -> ignore, v -> v - 1)
for datasets whose value 0 means "unlabeled" (ADE20K, Pascal Context 59, VOC without
background).

An image's key is its path relative to ``ROOT`` without the suffix; it is also matched by its
base name.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from schemas.io import open_uri

from .categories import GtCategory, parse_class_list
from .errors import AuditError
from .gt_base import GroundTruth, GtImage
from .metrics import IGNORE_INDEX, IGNORED
from .sources import decode_label_png, name_aliases, read_text

CLASS_LIST_NAME = "classes.txt"


def reduce_zero_label(values: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 -> 255, v -> v - 1, and 255 stays 255."""
    out = values - 1
    out[values == 0] = IGNORE_INDEX
    out[values == IGNORE_INDEX] = IGNORE_INDEX
    return out


def to_internal(values: np.ndarray) -> np.ndarray:
    """File label values -> audit convention (255 -> :data:`IGNORED`)."""
    return np.where(values == IGNORE_INDEX, IGNORED, values).astype(np.int64)


def load_class_list(uri: str, storage_options: Mapping | None = None) -> list[GtCategory]:
    """Read a class list file (see module docstring)."""
    return parse_class_list(read_text(uri, storage_options, "class list"), uri)


class MaskFolderGroundTruth(GroundTruth):
    """Semantic masks under a folder or prefix.

    Args:
        uri: root folder or prefix (any fsspec URI).
        classes: class list; default read from ``ROOT/classes.txt``.
        suffix: file-name ending of the masks.
        reduce_zero_label: apply mmseg's ``reduce_zero_label``.
        storage_options: fsspec options.
    """

    def __init__(self, uri: str, classes: list[GtCategory] | None = None, suffix: str = ".png",
                 reduce_zero_label: bool = False, storage_options: Mapping | None = None) -> None:
        super().__init__()
        self.uri = uri.rstrip("/")
        self.suffix = suffix
        self.reduce_zero_label = reduce_zero_label
        self._fs, self._root = open_uri(self.uri, storage_options)
        self._root = self._root.rstrip("/")
        self.categories = classes if classes is not None else self._default_classes(
            storage_options)
        self._paths: dict[str, str] = {}
        for path in self._list():
            key = path[len(self._root) + 1: len(path) - len(suffix)]
            self._paths[key] = path
            self.index.add(key, name_aliases(key))
        self.description = f"masks {self.uri} ({len(self._paths)} *{suffix} files)"

    def _default_classes(self, storage_options: Mapping | None) -> list[GtCategory]:
        path = f"{self.uri}/{CLASS_LIST_NAME}"
        if not self._fs.exists(f"{self._root}/{CLASS_LIST_NAME}"):
            raise AuditError(f"mask ground truth needs a class list: pass --gt-classes FILE or "
                             f"put one at {path}")
        return load_class_list(path, storage_options)

    def _list(self) -> list[str]:
        if not self._fs.isdir(self._root):
            raise AuditError(f"mask ground truth folder not found: {self.uri}")
        paths = sorted(p for p in self._fs.find(self._root) if p.endswith(self.suffix))
        if not paths:
            raise AuditError(f"no *{self.suffix} mask files under {self.uri}")
        return paths

    def load(self, key: str) -> GtImage:
        path = self._paths[key]
        where = f"mask {self.uri}/{key}{self.suffix}"
        try:
            with self._fs.open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise AuditError(f"cannot read {where}: {error}") from None
        values = decode_label_png(data, where)
        if self.reduce_zero_label:
            values = reduce_zero_label(values)
        return GtImage(key, to_internal(values), None)
