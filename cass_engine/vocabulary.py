"""Vocabulary files: one class per line, synonyms separated by ", ".

The format is the one of the bundled preset files: line ``i`` (counting non-blank lines from 0)
is class ``i``; its first name is the display name and every name is a text query. The first
class plays the role of background for the ``prob_thd`` rule (pixels whose best class
probability is below the threshold get class 0).

A line may start with a display name in square brackets, ``[background] sky, wall, tree``:
the class is shown as ``background`` (overlays, ``class_names``) and queried with the words
after the brackets only, so the text embeddings and ``content_hash`` are those of the line
without the brackets. The VOC21 and COCO-Object presets name their 26-word background line so.

Names are kept as written (a trailing space inside a line, as in one official file, is kept:
CLIP's tokenizer drops it), only the line break is removed. Blank lines are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SYNONYM_SEPARATOR = ", "


class VocabularyError(ValueError):
    """A vocabulary file is missing, empty or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    """Classes and their text queries.

    Attributes:
        classes: one tuple of names per class (its text queries).
        source: where the vocabulary came from (a path or ``preset:NAME``), for records.
        display_names: empty, or per class the name given in brackets (None where none was
            given: the first query is shown).
    """

    classes: tuple[tuple[str, ...], ...]
    source: str = "<memory>"
    display_names: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.classes:
            raise VocabularyError(f"vocabulary {self.source} has no classes")
        for index, names in enumerate(self.classes):
            if not names or any(not name.strip() for name in names):
                raise VocabularyError(
                    f"vocabulary {self.source}: class {index} has an empty name {names!r}"
                )
        if self.display_names and len(self.display_names) != len(self.classes):
            raise VocabularyError(f"vocabulary {self.source}: {len(self.display_names)} "
                                  f"display names for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Display names, one per class: the bracketed name where the file gives one, else
        the first synonym (surrounding spaces removed)."""
        given = self.display_names or (None,) * len(self.classes)
        return [shown or names[0].strip() for shown, names in zip(given, self.classes,
                                                                    strict=True)]

    @property
    def query_words(self) -> list[str]:
        """All text queries, class by class, in file order (length Q)."""
        return [name for names in self.classes for name in names]

    @property
    def query_to_class(self) -> list[int]:
        """Class index of each query (length Q)."""
        return [c for c, names in enumerate(self.classes) for _ in names]

    @property
    def num_queries(self) -> int:
        return len(self.query_words)

    def content_hash(self) -> str:
        """SHA-256 of the canonical text (one line per class), stable across sources.

        Display names are not part of it: they change no query and no label."""
        text = "\n".join(SYNONYM_SEPARATOR.join(names) for names in self.classes)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def duplicate_queries(self) -> list[str]:
        """Query words that appear more than once (allowed, but usually a mistake)."""
        seen: set[str] = set()
        dupes: list[str] = []
        for word in self.query_words:
            key = word.strip()
            if key in seen and key not in dupes:
                dupes.append(key)
            seen.add(key)
        return dupes


def parse_vocabulary(text: str, source: str = "<memory>") -> Vocabulary:
    """Parse vocabulary text: one class per non-blank line, synonyms split on ", "."""
    if "\x00" in text:
        raise VocabularyError(f"vocabulary {source} is not a text file")
    classes, shown = [], []
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        display, line = split_display_name(line, f"vocabulary {source}, line {line_number}")
        shown.append(display)
        names = tuple(line.split(SYNONYM_SEPARATOR))
        if any(not name.strip() for name in names):
            raise VocabularyError(
                f"vocabulary {source}, line {line_number}: empty synonym in {line!r} "
                f"(synonyms are separated by {SYNONYM_SEPARATOR!r})"
            )
        classes.append(names)
    if not classes:
        raise VocabularyError(f"vocabulary {source} is empty: expected one class per line")
    display_names = tuple(shown) if any(name is not None for name in shown) else ()
    return Vocabulary(tuple(classes), source, display_names)


def split_display_name(line: str, where: str) -> tuple[str | None, str]:
    """``"[name] a, b"`` -> ``("name", "a, b")``; a line without brackets is returned whole.

    Raises:
        VocabularyError: an unclosed or empty bracket, or no query after it.
    """
    if not line.startswith("["):
        return None, line
    end = line.find("]")
    display, rest = (line[1:end].strip(), line[end + 1:].lstrip()) if end > 0 else ("", "")
    if not display or not rest.strip():
        raise VocabularyError(f"{where}: {line!r}: a display name is written '[name] query, "
                              "query' (closed bracket, a name, then at least one query)")
    return display, rest


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read a vocabulary file from a local path.

    Raises:
        VocabularyError: the file is missing, unreadable, not UTF-8 text or has no classes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary file not found: {path}") from None
    except OSError as error:
        raise VocabularyError(f"cannot read vocabulary file {path}: {error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise VocabularyError(f"vocabulary file {path} is not UTF-8 text") from None
    return parse_vocabulary(text, str(path))


def bundled_vocabulary(file_name: str) -> Vocabulary:
    """One of the vocabulary files shipped with the package (``presets/<file_name>``)."""
    text = resources.files("cass_engine").joinpath("presets", file_name).read_text("utf-8")
    return parse_vocabulary(text, f"bundled:{file_name}")
