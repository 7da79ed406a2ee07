"""The eight benchmarks of the CASS paper: mmsegmentation layouts, label rules, published numbers.

Each benchmark reads the directory layout of the mmsegmentation data-preparation guide and the
label conventions of the dataset classes the official configs use (mmseg 1.x, plus SCLIP's
``PascalVOC20Dataset``, ``PascalContext59/60Dataset`` and ``COCOObjectDataset``):

============  ==============================  ===================================  ==========
benchmark     images (under the data root)    masks                                 zero label
============  ==============================  ===================================  ==========
voc21         VOC2012/JPEGImages/*.jpg        SegmentationClass/*.png               kept
voc20         VOC2012/JPEGImages/*.jpg        SegmentationClass/*.png               reduced
context60     VOC2010/JPEGImages/*.jpg        SegmentationClassContext/*.png        kept
context59     VOC2010/JPEGImages/*.jpg        SegmentationClassContext/*.png        reduced
coco_stuff    images/val2017/*.jpg            annotations/val2017/*_labelTrainIds   kept
coco_object   images/val2017/*.jpg            annotations/val2017/*_instanceTrainIds kept
cityscapes    leftImg8bit/val/*/*_leftImg8bit gtFine/val/*/*_gtFine_labelTrainIds   kept
ade20k        images/validation/*.jpg         annotations/validation/*.png          reduced
============  ==============================  ===================================  ==========

VOC and Context list their images in ``ImageSets/Segmentation/val.txt`` and
``ImageSets/SegmentationContext/val.txt`` (file order); the others are every image under the
image folder, sorted by path (as mmseg sorts its data list). "Reduced" is mmseg's
``reduce_zero_label`` (0 -> 255, v -> v - 1). Value 255 is ignored. Images are read as RGB
with Pillow; predictions are compared at the original image size.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cass_engine.staging import check_weight_choice
from pipeline.progress import ProgressLine

from .categories import identity_mapping
from .errors import AuditError
from .evaluator import EvaluationResult, Evaluator
from .gt_masks import reduce_zero_label, to_internal
from .sources import decode_label_png
from .worst import ImageRef

SegmentFn = Callable[[list[np.ndarray]], list[np.ndarray]]

_VOC = ("", "VOC2012", "VOCdevkit/VOC2012")
_CONTEXT = ("", "VOC2010", "VOCdevkit/VOC2010")
_COCO = ("", "coco_stuff164k")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark.

    Attributes:
        name: benchmark and engine preset name.
        vocabulary_file: the preset's bundled vocabulary (class ``i`` = dataset label ``i``).
        image_dir, mask_dir: folders relative to the dataset root.
        image_suffix, mask_suffix: file-name endings replacing each other.
        split_file: list of image names relative to the dataset root, or ``None`` (scan).
        reduce_zero_label: apply mmseg's ``reduce_zero_label`` to the masks.
        root_candidates: subfolders of ``--data-root`` tried in order as the dataset root.
        published_miou, published_aacc: the paper's numbers (percent).
        background_first: class 0 is the background class (named "background" in reports).
    """

    name: str
    vocabulary_file: str
    image_dir: str
    mask_dir: str
    image_suffix: str
    mask_suffix: str
    split_file: str | None
    reduce_zero_label: bool
    root_candidates: tuple[str, ...]
    published_miou: float
    published_aacc: float
    background_first: bool = False

    def class_names(self) -> list[str]:
        """Display names of the classes (first synonym; "background" for a background class)."""
        names = [line.split(", ")[0].strip() for line in _preset_lines(self.vocabulary_file)]
        if self.background_first:
            names[0] = "background"
        return names


def _spec(name: str, vocab: str, dirs: tuple[str, str], suffixes: tuple[str, str],
          split: str | None, reduce: bool, roots: tuple[str, ...], published: tuple[float, float],
          background_first: bool = False) -> BenchmarkSpec:
    return BenchmarkSpec(name, vocab, dirs[0], dirs[1], suffixes[0], suffixes[1], split, reduce,
                         roots, published[0], published[1], background_first)


_VOC_DIRS = ("JPEGImages", "SegmentationClass")
_CONTEXT_DIRS = ("JPEGImages", "SegmentationClassContext")
_COCO_DIRS = ("images/val2017", "annotations/val2017")
_VOC_SPLIT = "ImageSets/Segmentation/val.txt"
_CONTEXT_SPLIT = "ImageSets/SegmentationContext/val.txt"

#: The benchmarks in the paper's table order.
BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (
    _spec("voc21", "voc21.txt", _VOC_DIRS, (".jpg", ".png"), _VOC_SPLIT, False, _VOC,
          (65.8, 90.1), background_first=True),
    _spec("context60", "context60.txt", _CONTEXT_DIRS, (".jpg", ".png"), _CONTEXT_SPLIT, False,
          _CONTEXT, (36.7, 55.6), background_first=True),
    _spec("coco_object", "coco_object.txt", _COCO_DIRS, (".jpg", "_instanceTrainIds.png"), None,
          False, _COCO, (37.8, 76.0), background_first=True),
    _spec("voc20", "voc20.txt", _VOC_DIRS, (".jpg", ".png"), _VOC_SPLIT, True, _VOC,
          (87.8, 93.9)),
    _spec("context59", "context59.txt", _CONTEXT_DIRS, (".jpg", ".png"), _CONTEXT_SPLIT, True,
          _CONTEXT, (40.2, 65.0)),
    _spec("coco_stuff", "coco_stuff.txt", _COCO_DIRS, (".jpg", "_labelTrainIds.png"), None,
          False, _COCO, (26.7, 43.6)),
    _spec("cityscapes", "city_scapes.txt", ("leftImg8bit/val", "gtFine/val"),
          ("_leftImg8bit.png", "_gtFine_labelTrainIds.png"), None, False, ("", "cityscapes"),
          (39.4, 78.2)),
    _spec("ade20k", "ade20k.txt", ("images/validation", "annotations/validation"),
          (".jpg", ".png"), None, True, ("", "ADEChallengeData2016", "ade/ADEChallengeData2016"),
          (20.4, 48.6)),
)}


def get_benchmark(name: str) -> BenchmarkSpec:
    """A benchmark by name (raises ``AuditError`` listing the known names)."""
    if name not in BENCHMARKS:
        raise AuditError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclass(frozen=True)
class EvaluateConfig:
    """One benchmark run of ``jobs/evaluate.py`` (its flags default to these values).

    Attributes:
        benchmark: a name of :data:`BENCHMARKS`.
        data_root: dataset folder in the mmsegmentation layout (or its parent).
        limit: evaluate only the first ``limit`` images (``None``: all).
        clip_weights: OpenAI CLIP ViT-B/16 checkpoint (``None``: the official weights, downloaded).
        dino_weights: official DINO ViT-B/8 checkpoint (``None``: the official weights, downloaded).
        random_weights: seed of random backbones for smoke runs (numbers meaningless).
        device: torch device of the engine.
        batch_size: images per engine call.
        report_dir: also write an audit-style report there.
        worst_k: worst images shown in the report.
        progress: progress line on stderr.

    Raises:
        AuditError: an unknown benchmark or an out-of-range value (one line).
    """

    benchmark: str
    data_root: str
    limit: int | None = None
    clip_weights: str | None = None
    dino_weights: str | None = None
    random_weights: int | None = None
    device: str = "cpu"
    batch_size: int = 1
    report_dir: str | None = None
    worst_k: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        get_benchmark(self.benchmark)
        if self.limit is not None and self.limit < 1:
            raise AuditError("--limit must be >= 1")
        if self.batch_size < 1:
            raise AuditError("--batch-size must be >= 1")
        if self.worst_k < 0:
            raise AuditError("--worst-k must be >= 0")
        try:
            check_weight_choice(self.clip_weights, self.dino_weights, self.random_weights)
        except ValueError as error:
            raise AuditError(str(error)) from None

    @property
    def spec(self) -> BenchmarkSpec:
        """The benchmark's :class:`BenchmarkSpec`."""
        return BENCHMARKS[self.benchmark]


def _preset_lines(file_name: str) -> list[str]:
    """Non-blank lines of a bundled preset vocabulary, read without importing the engine."""
    spec = importlib.util.find_spec("cass_engine")
    if spec is None or not spec.submodule_search_locations:
        raise AuditError("the cass_engine package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "presets" / file_name
    return [line for line in path.read_text("utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class BenchmarkSample:
    """One image of a benchmark: its id (relative name) and file paths."""

    image_id: str
    image_path: Path
    mask_path: Path


def resolve_root(spec: BenchmarkSpec, data_root: str | Path) -> Path:
    """The dataset root: the first candidate under ``data_root`` holding the image folder."""
    base = Path(data_root)
    for sub in spec.root_candidates:
        if (base / sub / spec.image_dir).is_dir():
            return base / sub
    tried = ", ".join(str(base / sub / spec.image_dir) for sub in spec.root_candidates)
    raise AuditError(f"{spec.name}: image folder not found (tried {tried}); expected the "
                     "mmsegmentation layout, see pipeline/audit/benchmarks.py")


def _names(spec: BenchmarkSpec, root: Path) -> list[str]:
    if spec.split_file is not None:
        split = root / spec.split_file
        if not split.is_file():
            raise AuditError(f"{spec.name}: split file not found: {split}")
        return [line.strip() for line in split.read_text().splitlines() if line.strip()]
    image_root = root / spec.image_dir
    paths = sorted(p for p in image_root.rglob(f"*{spec.image_suffix}") if p.is_file())
    return [p.relative_to(image_root).as_posix()[: -len(spec.image_suffix)] for p in paths]


def list_samples(spec: BenchmarkSpec, data_root: str | Path,
                 limit: int | None = None) -> list[BenchmarkSample]:
    """The evaluation images in mmseg order (first ``limit`` of them).

    Raises:
        AuditError: missing folders, split file, images or masks (naming the expected path).
    """
    root = resolve_root(spec, data_root)
    names = _names(spec, root)
    if limit is not None:
        names = names[:limit]
    if not names:
        raise AuditError(f"{spec.name}: no images under {root / spec.image_dir}")
    samples = []
    for name in names:
        image = root / spec.image_dir / f"{name}{spec.image_suffix}"
        mask = root / spec.mask_dir / f"{name}{spec.mask_suffix}"
        for path, what in ((image, "image"), (mask, "mask")):
            if not path.is_file():
                raise AuditError(f"{spec.name}: {what} of {name!r} not found: {path}")
        samples.append(BenchmarkSample(name, image, mask))
    return samples


def load_image(sample: BenchmarkSample) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB (the one image rule, :func:`cass_engine.images.decode_rgb`)."""
    from cass_engine.images import decode_rgb

    try:
        return decode_rgb(sample.image_path.read_bytes())
    except (OSError, ValueError) as error:
        raise AuditError(f"cannot read image {sample.image_path}: {error}") from None


def load_label_map(sample: BenchmarkSample, spec: BenchmarkSpec) -> np.ndarray:
    """``[H, W]`` int64 class indices after the benchmark's label rule; -1 = ignored."""
    values = decode_label_png(sample.mask_path.read_bytes(), f"mask {sample.mask_path}")
    if spec.reduce_zero_label:
        values = reduce_zero_label(values)
    return to_internal(values)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_benchmark(spec: BenchmarkSpec, data_root: str | Path, segment: SegmentFn,
                  limit: int | None = None, batch_size: int = 1, worst_k: int = 0,
                  progress: bool = True,
                  samples: Sequence[BenchmarkSample] | None = None) -> EvaluationResult:
    """Segment every sample and accumulate the mmseg metrics.

    Args:
        spec: the benchmark.
        data_root: folder holding the dataset (or the dataset root itself).
        segment: RGB images -> label maps ``[H, W]`` (class indices of the preset), same sizes.
        limit: evaluate only the first ``limit`` images.
        batch_size: images per ``segment`` call.
        worst_k: worst images kept for a report.
        progress: progress line on stderr.
        samples: the samples, when already listed (``data_root`` and ``limit`` then unused).
    """
    if samples is None:
        samples = list_samples(spec, data_root, limit)
    evaluator = Evaluator(identity_mapping(spec.class_names()), worst_k)
    meter = ProgressLine(spec.name, len(samples), sys.stderr if progress else None)
    for batch in _batches(samples, batch_size):
        predictions = segment([load_image(s) for s in batch])
        for sample, pred in zip(batch, predictions, strict=True):
            ref = ImageRef(sample.image_id, str(sample.image_path))
            evaluator.add(ref, load_label_map(sample, spec), np.asarray(pred, dtype=np.int64))
        meter.update(len(batch))
    meter.close()
    return evaluator.result()


def comparison_table(spec: BenchmarkSpec, result: EvaluationResult) -> str:
    """Measured mIoU / aAcc / mAcc next to the published numbers, as aligned text."""
    def fmt(value: float) -> str:
        return "n/a" if np.isnan(value) else f"{100.0 * value:.2f}"

    summary = result.summary
    head = f"{'benchmark':<12} {'images':>7} {'mIoU':>7} {'paper':>7} {'aAcc':>7} {'paper':>7} " \
           f"{'mAcc':>7}"
    row = (f"{spec.name:<12} {result.num_images:>7} {fmt(summary['mIoU']):>7} "
           f"{spec.published_miou:>7.1f} {fmt(summary['aAcc']):>7} {spec.published_aacc:>7.1f} "
           f"{fmt(summary['mAcc']):>7}")
    return f"{head}\n{row}"
