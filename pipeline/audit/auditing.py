"""The audit: stream the labels, match each row to a ground-truth image, evaluate, report."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.progress import ProgressLine
from pipeline.source_images import run_io
from schemas.confidence import decode_levels
from schemas.io import open_uri, output_provenance
from schemas.uris import public_text, public_uri

from ..config import is_inline_json
from .calibration import CalibrationAccumulator, write_calibration
from .categories import build_mapping, parse_mapping_text
from .errors import AuditError
from .evaluator import EvaluationResult, Evaluator
from .gt_base import GroundTruth
from .gt_coco import UNLABELED_CHOICES, CocoGroundTruth
from .gt_masks import MaskFolderGroundTruth, load_class_list
from .predictions import (
    LabelsSource,
    is_ok,
    iter_rows,
    open_labels,
    row_aliases,
    row_class_scores,
    row_label_map,
    row_presence,
)
from .report import EXAMPLES, build_metrics
from .report_files import write_report
from .sources import load_source_image, name_aliases, read_text
from .worst import ImageRef

GT_FORMATS = ("coco", "masks", "parquet", "labelstudio")
EXIT_OK, EXIT_BELOW_BAR = 0, 1


@dataclass(frozen=True)
class AuditConfig:
    """Inputs and options of one audit (see ``jobs/audit.py`` for the command line).

    Attributes:
        labels: the pipeline's output root (``labels/`` + ``run.json``).
        ground_truth: COCO JSON file, mask folder/prefix, or labels-schema output root.
        report_dir: where the report files go.
        gt_format: ``"coco"``, ``"masks"`` or ``"parquet"``; ``None`` detects it.
        category_map: class -> ground-truth category mapping, optional: inline JSON (a
            value starting with ``{``) or the path/URL of a JSON file.
        gt_classes: class list of mask ground truth (default ``ROOT/classes.txt``).
        mask_suffix: file-name ending of the masks.
        reduce_zero_label: mmseg's rule for masks whose 0 means unlabeled.
        image_suffix: file-name ending of the labelled images, removed from their keys when
            matching (e.g. ``_leftImg8bit.png`` against Cityscapes ``gtFine`` masks).
        coco_unlabeled: ``"background"`` or ``"ignore"`` for pixels no COCO annotation covers.
        worst_k: number of worst images shown with overlays.
        coco_ap: also compute COCOeval segm AP (memory grows with the dataset).
        fail_under: mIoU bar in percent; below it the audit exits with status 1.
        storage_options: fsspec options for every URI.
        progress: show progress on stderr.
        label_studio_url: ``labelstudio`` format: pull the export of ``label_studio_project``
            from this server instead of reading ``ground_truth``.
        label_studio_project: project title or id on that server.
        label_studio_token: API token for that server (from the environment).
        calibrate_precision: also compute per-class confidence thresholds reaching this
            pixel precision (``thresholds.json``; needs labels with confidence).
    """

    labels: str
    ground_truth: str
    report_dir: str
    gt_format: str | None = None
    category_map: str | None = None
    gt_classes: str | None = None
    mask_suffix: str = ".png"
    reduce_zero_label: bool = False
    image_suffix: str | None = None
    coco_unlabeled: str = "background"
    worst_k: int = 8
    coco_ap: bool = False
    fail_under: float | None = None
    storage_options: dict = field(default_factory=dict)
    progress: bool = True
    label_studio_url: str | None = None
    label_studio_project: str | None = None
    label_studio_token: str | None = field(default=None, repr=False)
    calibrate_precision: float | None = None

    def __post_init__(self) -> None:
        if self.gt_format is not None and self.gt_format not in GT_FORMATS:
            raise AuditError(f"--gt-format must be one of {', '.join(GT_FORMATS)}")
        if self.coco_unlabeled not in UNLABELED_CHOICES:
            raise AuditError(f"--coco-unlabeled must be one of {', '.join(UNLABELED_CHOICES)}")
        if self.worst_k < 0:
            raise AuditError("--worst-k must be >= 0")
        if self.fail_under is not None and not 0.0 <= self.fail_under <= 100.0:
            raise AuditError("--fail-under is an mIoU in percent (0..100)")
        if self.calibrate_precision is not None and not 0.0 < self.calibrate_precision <= 1.0:
            raise AuditError("--calibrate-precision is a pixel precision in (0, 1]")


@dataclass
class AuditOutcome:
    """What an audit produced: the metrics document, written files and the exit status."""

    metrics: dict
    files: list[str]
    exit_code: int


@dataclass
class MatchLog:
    """Images that were not evaluated, by reason (never dropped silently)."""

    matched: set[str] = field(default_factory=set)
    predictions: list[str] = field(default_factory=list)
    failed_predictions: list[tuple[str, str]] = field(default_factory=list)
    invalid_predictions: list[tuple[str, str]] = field(default_factory=list)
    duplicate_predictions: list[tuple[str, str]] = field(default_factory=list)


def detect_format(uri: str, storage_options: Mapping | None = None) -> str:
    """``coco`` for ``*.json``; ``parquet`` for a folder with ``run.json`` or ``labels/``;
    otherwise ``masks``."""
    if uri.lower().endswith(".json"):
        return "coco"
    fs, root = open_uri(uri, storage_options)
    root = root.rstrip("/")
    if fs.exists(f"{root}/run.json") or fs.isdir(f"{root}/labels"):
        return "parquet"
    return "masks"


def open_ground_truth(config: AuditConfig) -> GroundTruth:
    """The ground-truth reader for the configured (or detected) format."""
    options = config.storage_options
    fmt = config.gt_format or detect_format(config.ground_truth, options)
    if fmt == "labelstudio":
        from .gt_labelstudio import open_labelstudio

        return open_labelstudio(config)
    if fmt == "coco":
        return CocoGroundTruth(config.ground_truth, options, config.coco_unlabeled)
    if fmt == "parquet":
        from .gt_parquet import ParquetGroundTruth

        return ParquetGroundTruth(config.ground_truth, options)
    classes = load_class_list(config.gt_classes, options) if config.gt_classes else None
    return MaskFolderGroundTruth(config.ground_truth, classes, config.mask_suffix,
                                 config.reduce_zero_label, options)


def _candidates(row: dict, image_suffix: str | None) -> list[str]:
    aliases = row_aliases(row)
    key = str(row.get("key") or "")
    if image_suffix and key.endswith(image_suffix):
        aliases += name_aliases(key[: -len(image_suffix)])
    return aliases


def _evaluate_row(row: dict, labels: LabelsSource, gt: GroundTruth, evaluator: Evaluator,
                  log: MatchLog, image_suffix: str | None = None,
                  calibration: CalibrationAccumulator | None = None) -> str:
    """Evaluate or log one labels row; returns what happened (for the progress line).

    A failed row still claims its ground-truth image, which is then reported under
    ``failed_predictions`` rather than as unmatched ground truth.
    """
    image_id = str(row.get("image_id"))
    key = gt.match(_candidates(row, image_suffix))
    if not is_ok(row):
        log.failed_predictions.append((image_id, f"{row.get('status')}: {row.get('error')}"))
        if key is not None:
            log.matched.add(key)
        return "failed"
    if key is None:
        log.predictions.append(image_id)
        return "unmatched"
    if key in log.matched:
        log.duplicate_predictions.append((image_id, key))
        return "duplicate"
    log.matched.add(key)
    try:
        pred = row_label_map(row, labels)
    except (ValueError, KeyError, TypeError) as error:
        log.invalid_predictions.append((image_id, str(error)))
        return "invalid"
    ref = ImageRef(image_id, row.get("source_uri"), row.get("key"))
    gt_map = gt.load(key).label_map
    evaluator.add(ref, gt_map, pred, row_presence(row), row_class_scores(row, labels))
    if calibration is not None:
        if row.get("confidence") is None:
            calibration.without_confidence.append(image_id)
            return "no confidence"
        calibration.add(gt_map, pred, decode_levels(row["confidence"], *pred.shape))
    return "ok"


def _unmatched(log: MatchLog, gt: GroundTruth, labels: LabelsSource) -> tuple[dict, dict]:
    lists = {
        "ground_truth": [k for k in gt.keys() if k not in log.matched],
        "predictions": log.predictions,
        "failed_predictions": log.failed_predictions,
        "invalid_predictions": log.invalid_predictions,
        "duplicate_predictions": log.duplicate_predictions,
        "incomplete_shards": labels.incomplete_shards,
        "ground_truth_not_ok": list(getattr(gt, "not_ok", [])),
    }
    counts: dict = {kind: len(items) for kind, items in lists.items()}
    counts["examples"] = {kind: [item[0] if isinstance(item, tuple) else item
                                 for item in items[:EXAMPLES]] for kind, items in lists.items()}
    return counts, lists


def _mapping(config: AuditConfig, labels: LabelsSource, gt: GroundTruth):
    explicit = None
    if config.category_map and is_inline_json(config.category_map):  # like --storage-options
        explicit = parse_mapping_text(config.category_map, "(inline JSON)")
    elif config.category_map:
        text = read_text(config.category_map, config.storage_options, "category map")
        explicit = parse_mapping_text(text, config.category_map)
    mapping = build_mapping(labels.classes, gt.categories, explicit)
    if not mapping.mapped_gt:
        raise AuditError("no vocabulary class matches a ground-truth category by name; "
                         "pass --category-map FILE")
    return mapping


def evaluate_labels(config: AuditConfig, calibration_out: list | None = None
                    ) -> tuple[EvaluationResult, dict, dict, dict]:
    """Run the evaluation; returns (result, unmatched counts, unmatched lists, sources).

    With ``config.calibrate_precision``, the filled :class:`CalibrationAccumulator` and the
    class names are appended to ``calibration_out``.
    """
    labels = open_labels(config.labels, config.storage_options)
    gt = open_ground_truth(config)
    mapping = _mapping(config, labels, gt)
    evaluator = Evaluator(mapping, config.worst_k, config.coco_ap)
    calibration = None
    if config.calibrate_precision is not None:
        calibration = CalibrationAccumulator(mapping.class_to_gt, mapping.num_gt)
        if calibration_out is not None:
            calibration_out.append((calibration, [c.name for c in labels.categories]))
    log = MatchLog()
    progress = ProgressLine("audit: rows", None, sys.stderr if config.progress else None)
    for row in iter_rows(labels):
        outcome = _evaluate_row(row, labels, gt, evaluator, log, config.image_suffix,
                                calibration)
        progress.update(1, **({outcome: 1} if outcome != "ok" else {}))
    progress.close()
    counts, lists = _unmatched(log, gt, labels)
    sources = {"labels": public_uri(config.labels), "ground_truth": public_text(gt.description),
               "vocabulary_hash": labels.vocabulary_hash,
               "random_weights": labels_random_weights(config.labels, config.storage_options)}
    return evaluator.result(), counts, lists, sources


def run_audit(config: AuditConfig) -> AuditOutcome:
    """Evaluate, write the report, and decide the exit status against ``fail_under``."""
    calibrations: list[tuple[CalibrationAccumulator, list[str]]] = []
    result, counts, lists, sources = evaluate_labels(config, calibrations)
    metrics = build_metrics(result, counts, sources, config.fail_under)
    options = config.storage_options

    io = run_io(config.labels, options)  # how the sources were read (Parquet columns)

    def load_image(ref: ImageRef):
        return load_source_image(ref.source_uri, ref.key, options, ref.image_id, io)

    files = write_report(config.report_dir, result, metrics, lists, load_image, options)
    if calibrations:
        accumulator, names = calibrations[0]
        files += write_calibration(config.report_dir, accumulator, names,
                                   config.calibrate_precision, sources, options)
    return AuditOutcome(metrics, files, below_bar(metrics["mIoU"], config.fail_under))


def labels_random_weights(uri: str, storage_options: Mapping | None) -> int | None:
    """The random-weights seed the labels were made with (None: real weights or unknown)."""
    try:
        return output_provenance(uri, storage_options)["random_weights"]
    except (OSError, ValueError):
        return None


def below_bar(miou_percent: float | None, fail_under: float | None) -> int:
    """Exit status: 1 when a bar is set and mIoU is below it (or undefined), else 0."""
    if fail_under is None:
        return EXIT_OK
    if miou_percent is None or math.isnan(miou_percent) or miou_percent < fail_under:
        return EXIT_BELOW_BAR
    return EXIT_OK
