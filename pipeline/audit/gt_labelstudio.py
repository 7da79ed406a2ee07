"""Ground truth from a Label Studio JSON export: the reviewers' brush masks.

Each exported task with at least one annotation that was not cancelled is one ground-truth
image; tasks nobody annotated are not ground truth (their labels rows are unmatched). Rules:

- Which annotation: the one updated last (then the highest id) among those not cancelled.
  An image in several annotated tasks (sent twice) keeps the latest-updated annotation across
  those tasks (then the later task); the duplicates are counted in the description.
- Key: the task's ``data.cass_image_id`` (written by ``jobs/review.py``), else ``task-<id>``;
  the image URL's file name is an alias (not for ``data:`` URIs).
- Categories: every brush label name used in the chosen annotations, sorted by name;
  classes map to them by name as for other formats.
- Pixels: each ``brushlabels`` region (Label Studio brush RLE, alpha > 0 is inside) paints its
  label in result order, so a later region wins where regions overlap; pixels no region covers
  are ignored. Other region types (polygons, boxes) are not read and are counted. A reviewed
  task without any brush region is listed as ground truth that is not usable.

The export is untrusted: its size, image sizes and every region are checked, and a bad one is
a one-line error naming the task.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from schemas.io import open_uri

from .categories import GtCategory
from .errors import AuditError
from .gt_base import GroundTruth, GtImage
from .metrics import IGNORED
from .sources import name_aliases

MAX_EXPORT_BYTES = 1024 * 1024 * 1024
MAX_PIXELS = 64 * 1024 * 1024


def read_export(uri: str, storage_options: Mapping | None = None,
                max_bytes: int = MAX_EXPORT_BYTES) -> list:
    """Read and parse a Label Studio JSON export (a list of tasks), bounded in size."""
    import json

    try:
        fs, path = open_uri(uri, storage_options)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise AuditError(f"Label Studio export {uri} has {size} bytes (limit {max_bytes})")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise AuditError(f"Label Studio export not found: {uri}") from None
    except OSError as error:
        raise AuditError(f"cannot read Label Studio export {uri}: {error}") from None
    if len(data) > max_bytes:
        raise AuditError(f"Label Studio export {uri} is larger than {max_bytes} bytes")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except RecursionError:
        raise AuditError(f"Label Studio export {uri} is nested too deeply to be a task "
                         "list") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise AuditError(f"Label Studio export {uri} is not valid JSON: {error}") from None


class LabelStudioGroundTruth(GroundTruth):
    """Ground truth from Label Studio tasks.

    Args:
        tasks: the parsed export (a list of task objects).
        description: where it came from, for reports.
    """

    def __init__(self, tasks: object, description: str) -> None:
        super().__init__()
        if not isinstance(tasks, list):
            raise AuditError(f"{description}: expected a JSON list of tasks")
        self._results: dict[str, tuple[str, list]] = {}
        self.skipped_regions = 0
        self.duplicate_tasks = 0
        self.not_ok: list[str] = []
        chosen: dict[str, tuple[tuple, str, list, dict]] = {}
        for position, task in enumerate(tasks):
            self._add_task(task, position, chosen, description)
        names: set[str] = set()
        for key, (_, where, brushes, data) in chosen.items():
            if not brushes:  # reviewed, but nothing painted: no pixel is known
                self.not_ok.append(key)
                continue
            names.update(_label_of(region, where) for region in brushes)
            self._results[key] = (where, brushes)
            self.index.add(key, _aliases(key, data))
        self.categories = [GtCategory(n, (), None) for n in sorted(names)]
        self._index_of = {c.name: g for g, c in enumerate(self.categories)}
        duplicates = (f"; {self.duplicate_tasks} duplicate tasks of an image already seen, "
                      "latest annotation kept" if self.duplicate_tasks else "")
        self.description = (f"Label Studio export {description} ({len(self._results)} "
                            f"reviewed of {len(tasks)} tasks{duplicates})")

    def _add_task(self, task: object, position: int, chosen: dict, source: str) -> None:
        if not isinstance(task, dict):
            raise AuditError(f"{source}: task #{position} is not an object")
        where = f"{source}: task {task.get('id', '#' + str(position))}"
        annotation = _chosen_annotation(task.get("annotations"), where)
        if annotation is None:
            return
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        key = str(data.get("cass_image_id") or f"task-{task.get('id', position)}")
        results = annotation.get("result")
        if not isinstance(results, list):
            raise AuditError(f"{where}: annotation result must be a list")
        brushes = [r for r in results if isinstance(r, dict)
                   and str(r.get("type", "")).lower() == "brushlabels"]
        self.skipped_regions += len(results) - len(brushes)
        for region in brushes:
            _label_of(region, where)
        if brushes:
            _common_size(brushes, where)
        order = (*_annotation_order(annotation), position)
        if key in chosen:
            self.duplicate_tasks += 1
            if chosen[key][0] > order:
                return
        chosen[key] = (order, where, brushes, data)

    def load(self, key: str) -> GtImage:
        """Paint the chosen annotation's brush regions into a label map."""
        from pipeline.review.brush import BrushError, decode_brush

        where, regions = self._results[key]
        size = _common_size(regions, where)
        label = np.full(size, IGNORED, dtype=np.int64)
        for region in regions:
            value = region.get("value") if isinstance(region.get("value"), dict) else {}
            try:
                mask = decode_brush(value.get("rle"), *size)
            except BrushError as error:
                raise AuditError(f"{where}: region {region.get('id')!r}: {error}") from None
            label[mask] = self._index_of[_label_of(region, where)]
        return GtImage(key, label, None)


def _chosen_annotation(annotations: object, where: str) -> dict | None:
    if annotations is None:
        return None
    if not isinstance(annotations, list):
        raise AuditError(f"{where}: 'annotations' must be a list")
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not usable:
        return None
    return max(usable, key=_annotation_order)


def _annotation_order(annotation: dict) -> tuple[str, int]:
    """Latest update (then creation) time, then id: the larger, the more recent."""
    return (str(annotation.get("updated_at") or annotation.get("created_at") or ""),
            _int_or(annotation.get("id"), -1))


def _label_of(region: dict, where: str) -> str:
    value = region.get("value")
    labels = value.get("brushlabels") if isinstance(value, dict) else None
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise AuditError(f"{where}: brush region {region.get('id')!r} has no brushlabels name")
    return labels[0]


def _common_size(regions: list, where: str) -> tuple[int, int]:
    sizes = set()
    for region in regions:
        height = _int_or(region.get("original_height"), 0)
        width = _int_or(region.get("original_width"), 0)
        if height <= 0 or width <= 0 or height * width > MAX_PIXELS:
            raise AuditError(f"{where}: region {region.get('id')!r} has an invalid image size "
                             f"{region.get('original_height')!r}x{region.get('original_width')!r}"
                             f" (HxW, at most {MAX_PIXELS} pixels)")
        sizes.add((height, width))
    if len(sizes) > 1:
        raise AuditError(f"{where}: brush regions disagree on the image size: {sorted(sizes)}")
    return sizes.pop()


def _aliases(key: str, data: dict) -> list[str]:
    aliases = [key]
    image = data.get("image")
    if isinstance(image, str) and not image.startswith("data:"):
        aliases += name_aliases(image.split("?", 1)[0])
    return aliases


def _int_or(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def open_labelstudio(config) -> LabelStudioGroundTruth:
    """The reader for an :class:`~pipeline.audit.auditing.AuditConfig`: the export file at
    ``ground_truth``, or the export pulled from ``label_studio_url`` / ``label_studio_project``.
    """
    if not config.label_studio_url:
        tasks = read_export(config.ground_truth, config.storage_options)
        return LabelStudioGroundTruth(tasks, config.ground_truth)
    from pipeline.review.client import LabelStudioClient, LabelStudioError

    if not config.label_studio_project:
        raise AuditError("--label-studio-url needs --project NAME_OR_ID")
    try:
        client = LabelStudioClient(config.label_studio_url, config.label_studio_token or "")
        project = client.require_project(config.label_studio_project)
        tasks = client.export_tasks(int(project["id"]))
    except LabelStudioError as error:
        raise AuditError(str(error)) from None
    where = f"{client.url} project {project['id']} ({project.get('title')})"
    return LabelStudioGroundTruth(tasks, where)
