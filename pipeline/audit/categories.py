"""Ground-truth categories and the mapping from vocabulary classes to them.

Metrics are computed in the *ground-truth* category space. Each vocabulary class maps to at
most one ground-truth category (several classes may map to the same category, e.g. the 26
stuff words of a background class). Mapping rules, in order:

1. An explicit mapping file (JSON object ``{"vocabulary class": "gt category" | id | null}``;
   keys are class display names, or any synonym; ``null`` leaves a class unmapped on purpose).
2. Otherwise by name: a class maps to the first ground-truth category (in ground-truth order)
   whose name equals one of the class's names (display name first, then synonyms), then to
   the first whose *synonyms* contain one. Names compare after lower-casing and turning ``_``
   and ``-`` into spaces and collapsing whitespace.

Evaluation space: index ``g`` for ground-truth category ``g`` and one extra index ``OTHER =
num_gt`` for everything without a counterpart: predictions of unmapped classes (and pixels no
prediction covers) and ground-truth pixels of categories no class maps to. Predicting a mapped
class on an ``OTHER`` ground-truth pixel is a false positive of that class; predicting an
unmapped class on a mapped category's pixel is a miss. Only mapped categories enter the means.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cass_engine.vocabulary import VocabularyError, split_display_name

from .errors import AuditError


@dataclass(frozen=True)
class GtCategory:
    """One ground-truth category.

    Attributes:
        name: display name.
        synonyms: other names accepted when mapping by name.
        source_id: the category's id in its source (COCO category id, mask label value).
    """

    name: str
    synonyms: tuple[str, ...] = ()
    source_id: int | None = None


def normalize_name(name: str) -> str:
    """Lower-case, ``_``/``-`` to spaces, collapse whitespace: ``"Potted_Plant"`` ->
    ``"potted plant"``."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name.lower())).strip()


def parse_class_list(text: str, source: str) -> list[GtCategory]:
    """A class list file: one class per non-blank line, synonyms separated by ``", "``; a
    line may start with a display name in brackets (``[background] sky, wall``, as the
    vocabulary format and the PNG export's ``classes.txt`` write it), which names the class.

    Line ``i`` (counting non-blank lines from 0) is label value ``i`` of the masks.
    """
    classes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                display, rest = split_display_name(line.strip(), f"{source}, line {number}")
            except VocabularyError as error:
                raise AuditError(str(error)) from None
            names = [n.strip() for n in rest.split(", ") if n.strip()]
            if display is not None:
                names = [display, *(n for n in names if n != display)]
            classes.append(GtCategory(names[0], tuple(names[1:]), len(classes)))
    if not classes:
        raise AuditError(f"class list {source} is empty: expected one class per line")
    return classes


@dataclass(frozen=True)
class CategoryMapping:
    """Vocabulary classes -> ground-truth categories.

    Attributes:
        class_names: display name of each vocabulary class (``K``).
        gt: the ground-truth categories (``G``); label value ``g`` is ``gt[g]``.
        class_to_gt: ground-truth index of each class, or ``None`` (unmapped).
        rule: how each class was mapped: ``"file"``, ``"name"``, ``"synonym"`` or ``""``.
    """

    class_names: tuple[str, ...]
    gt: tuple[GtCategory, ...]
    class_to_gt: tuple[int | None, ...]
    rule: tuple[str, ...]

    @property
    def num_gt(self) -> int:
        return len(self.gt)

    @property
    def other_index(self) -> int:
        """Evaluation index of everything without a counterpart."""
        return len(self.gt)

    @property
    def num_eval(self) -> int:
        """Size of the evaluation space: ``G + 1``."""
        return len(self.gt) + 1

    @property
    def mapped_gt(self) -> list[int]:
        """Sorted ground-truth indices that at least one class maps to."""
        return sorted({g for g in self.class_to_gt if g is not None})

    @property
    def unmapped_classes(self) -> list[str]:
        return [n for n, g in zip(self.class_names, self.class_to_gt, strict=True) if g is None]

    @property
    def unmapped_gt(self) -> list[str]:
        mapped = set(self.mapped_gt)
        return [c.name for g, c in enumerate(self.gt) if g not in mapped]

    def sources_of(self, g: int) -> list[str]:
        """Display names of the classes mapped to ground-truth category ``g``."""
        return [n for n, t in zip(self.class_names, self.class_to_gt, strict=True) if t == g]

    def pred_lookup(self) -> np.ndarray:
        """``[K + 1]`` int64: class index -> evaluation index; entry ``K`` (uncovered) is OTHER."""
        table = [self.other_index if g is None else g for g in self.class_to_gt]
        return np.asarray([*table, self.other_index], dtype=np.int64)

    def gt_lookup(self) -> np.ndarray:
        """``[G]`` int64: ground-truth index -> evaluation index (OTHER if unmapped)."""
        mapped = set(self.mapped_gt)
        table = [g if g in mapped else self.other_index for g in range(self.num_gt)]
        return np.asarray(table, dtype=np.int64)

    def to_dict(self) -> dict:
        """JSON view: pairs, rules and the unmapped names on both sides."""
        pairs = {
            name: {"gt": None if g is None else self.gt[g].name, "rule": rule or None}
            for name, g, rule in zip(self.class_names, self.class_to_gt, self.rule, strict=True)
        }
        return {"classes": pairs, "unmapped_classes": self.unmapped_classes,
                "unmapped_gt_categories": self.unmapped_gt}


def identity_mapping(names: Sequence[str]) -> CategoryMapping:
    """Class ``i`` -> category ``i`` (benchmarks, where the preset and dataset share indices)."""
    gt = tuple(GtCategory(n, (), i) for i, n in enumerate(names))
    return CategoryMapping(tuple(names), gt, tuple(range(len(names))), ("index",) * len(names))


def build_mapping(
    classes: Sequence[Sequence[str]],
    gt: Sequence[GtCategory],
    explicit: Mapping[str, object] | None = None,
) -> CategoryMapping:
    """Map vocabulary classes to ground-truth categories (see module docstring).

    Args:
        classes: per class, its names; the first is the display name.
        gt: ground-truth categories in label-value order.
        explicit: parsed mapping file, or ``None``.

    Raises:
        AuditError: the mapping file names an unknown class or category.
    """
    fixed = _resolve_explicit(classes, gt, explicit or {})
    by_name, by_synonym = _name_indexes(gt)
    targets, rules = [], []
    for c, names in enumerate(classes):
        if c in fixed:
            targets.append(fixed[c])
            rules.append("file")
            continue
        g, rule = _match_names(names, by_name, by_synonym)
        targets.append(g)
        rules.append(rule)
    display = tuple(names[0].strip() for names in classes)
    return CategoryMapping(display, tuple(gt), tuple(targets), tuple(rules))


def _name_indexes(gt: Sequence[GtCategory]) -> tuple[dict[str, int], dict[str, int]]:
    by_name: dict[str, int] = {}
    by_synonym: dict[str, int] = {}
    for g, cat in enumerate(gt):
        by_name.setdefault(normalize_name(cat.name), g)
        for synonym in cat.synonyms:
            by_synonym.setdefault(normalize_name(synonym), g)
    return by_name, by_synonym


def _match_names(
    names: Sequence[str], by_name: dict[str, int], by_synonym: dict[str, int]
) -> tuple[int | None, str]:
    keys = [normalize_name(n) for n in names]
    for index in (by_name, by_synonym):
        for key in keys:
            if key in index:
                return index[key], "name" if index is by_name else "synonym"
    return None, ""


def _resolve_explicit(
    classes: Sequence[Sequence[str]], gt: Sequence[GtCategory], explicit: Mapping[str, object]
) -> dict[int, int | None]:
    class_index: dict[str, int] = {}
    for c, names in enumerate(classes):
        for name in names:
            class_index.setdefault(normalize_name(name), c)
    fixed: dict[int, int | None] = {}
    for key, value in explicit.items():
        c = class_index.get(normalize_name(str(key)))
        if c is None:
            raise AuditError(f"category map: {key!r} is not a class of the labels' vocabulary")
        fixed[c] = None if value is None else _gt_index(value, gt)
    return fixed


def _gt_index(value: object, gt: Sequence[GtCategory]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        for g, cat in enumerate(gt):
            if cat.source_id == value:
                return g
        raise AuditError(f"category map: no ground-truth category has id {value}")
    wanted = normalize_name(str(value))
    for g, cat in enumerate(gt):
        if wanted in {normalize_name(n) for n in (cat.name, *cat.synonyms)}:
            return g
    raise AuditError(f"category map: {value!r} is not a ground-truth category")


def parse_mapping_text(text: str, source: str) -> dict[str, object]:
    """Parse a mapping file: a JSON object of class name -> category name, id or null."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AuditError(f"category map {source} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise AuditError(f"category map {source} must be a JSON object {{class: category}}")
    for key, value in data.items():
        if value is not None and not isinstance(value, (str, int)):
            raise AuditError(f"category map {source}: value of {key!r} must be a name, id or null")
    return data
