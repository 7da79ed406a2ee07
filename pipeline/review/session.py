"""The review step: rank a labels output, write Label Studio files, optionally push them.

Files written to ``DIR`` (any fsspec URI):

- ``tasks.json``: Label Studio tasks with the pseudo-labels as predictions (:mod:`.tasks`);
- ``labeling_config.xml``: the matching ``BrushLabels`` config;
- ``contact_sheet.html``: the selected overlays, self-contained;
- ``reviewed.json``: every batch sent from this folder (image ids, ranking, seed, time, the
  random-weights seed of the labels and the Label Studio project), read by
  ``exclude_reviewed`` to skip images already sent. When tasks are imported, the record is
  rewritten after each import request the server accepted, so a failure part-way leaves the
  images already imported recorded. URIs in it are public (no user info, no query).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.audit.predictions import open_labels
from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.source_images import SourceRef, read_sources
from schemas.io import iter_label_rows, open_uri, output_provenance, read_run_record
from schemas.times import utc_timestamp
from schemas.uris import public_uri

from .client import LabelStudioClient, LabelStudioError
from .images import data_uri
from .ranking import RANKINGS, ROW_COLUMNS, Ranked, top_k
from .sheet import decode_photo, overlay_png, render_sheet
from .tasks import ID_KEY, build_task, labeling_config

REVIEWED = "reviewed.json"
FILES = ("tasks.json", "labeling_config.xml", "contact_sheet.html")


class ReviewError(Exception):
    """Bad input to the review step (one line)."""


@dataclass(frozen=True)
class ReviewConfig:
    """Inputs and options of one review batch (see ``jobs/review.py``).

    Attributes:
        labels: the labeling output root.
        out_dir: where the files go.
        top: how many images to pick.
        by: ranking, one of :data:`RANKINGS`.
        seed: tie-break and ``random`` seed.
        exclude_reviewed: skip images listed in ``out_dir/reviewed.json``.
        embed_images: embed every image as a data URI, cloud objects too.
        label_studio_url: push the tasks to this server when set.
        project: project title or id on that server (a title that does not exist is created).
        token: API token (from the environment, never from the command line).
        storage_options: fsspec options for the labels, the images and ``out_dir``.
    """

    labels: str
    out_dir: str
    top: int
    by: str = "uncertainty"
    seed: int = 0
    exclude_reviewed: bool = False
    embed_images: bool = False
    label_studio_url: str | None = None
    project: str | None = None
    token: str | None = field(default=None, repr=False)
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ReviewError("--top must be >= 1")
        if self.by not in RANKINGS:
            raise ReviewError(f"--by must be one of {', '.join(RANKINGS)}")
        if self.label_studio_url and not self.project:
            raise ReviewError("--label-studio-url needs --project NAME_OR_ID")


@dataclass
class ReviewOutcome:
    """What a review batch produced."""

    selected: list[Ranked]
    files: list[str]
    missing_images: dict[str, str]
    project: dict | None = None
    imported: int = 0


def read_reviewed(out_dir: str, storage_options: Mapping | None = None) -> dict:
    """The ``reviewed.json`` record of ``out_dir`` (empty when there is none)."""
    fs, root = open_uri(out_dir, storage_options)
    path = f"{root}/{REVIEWED}"
    if not fs.exists(path):
        return {"batches": []}
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
        batches = record.get("batches")
        if not isinstance(batches, list) or not all(
                isinstance(b, dict) and isinstance(b.get("image_ids"), list) for b in batches):
            raise ValueError("expected {'batches': [{'image_ids': [...]}, ...]}")
        return record
    except (ValueError, AttributeError) as error:
        raise ReviewError(f"{out_dir.rstrip('/')}/{REVIEWED} is not a review record: "
                          f"{error}") from None


def reviewed_ids(record: Mapping) -> set[str]:
    """Every image id of every batch of a review record."""
    return {str(i) for batch in record["batches"] for i in batch["image_ids"]}


def _image_refs(items: list[Ranked], config: ReviewConfig, io: Mapping) -> tuple[dict, dict]:
    refs = [SourceRef(i.image_id, str(i.row["source_uri"]), str(i.row["key"]),
                      str(i.row.get("shard_id") or "")) for i in items]
    loaded = read_sources(refs, config.storage_options, io)
    max_pixels = int(io.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)
    chosen, missing = {}, {}
    for ref in refs:
        data = loaded[ref.image_id]
        if ref.cloud_url and not config.embed_images:
            chosen[ref.image_id] = ref.cloud_url
        elif isinstance(data, bytes):
            chosen[ref.image_id] = data_uri(data)
        if not isinstance(data, bytes):
            missing[ref.image_id] = data
    return chosen, {"loaded": loaded, "missing": missing, "max_pixels": max_pixels}


def _write(fs, path: str, text: str) -> None:
    with fs.open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def _connect(config: ReviewConfig) -> tuple[LabelStudioClient, dict | None]:
    """Check the server and the token, and find the project (``None``: to be created)."""
    client = LabelStudioClient(config.label_studio_url or "", config.token or "")
    client.check()
    project = client.project(config.project or "")
    if project is None and str(config.project).strip().isdigit():
        raise LabelStudioError(f"no Label Studio project {config.project!r} at {client.url}")
    return client, project


def _push(client: LabelStudioClient, project: dict | None, config: ReviewConfig, categories,
          tasks: list[dict], on_batch) -> tuple[dict, int]:
    if project is None:
        project = client.create_project(str(config.project), labeling_config(categories))
    missing = sorted({c.name for c in categories} - config_labels(project.get("label_config")))
    if missing:
        raise ReviewError(f"Label Studio project {project.get('id')} "
                          f"({project.get('title')}) has no brush label for "
                          f"{', '.join(map(repr, missing[:5]))}"
                          f"{' ...' if len(missing) > 5 else ''}; use a new project or add "
                          "them to its labeling config (see labeling_config.xml)")
    return project, client.import_tasks(int(project["id"]), tasks,
                                        lambda batch: on_batch(project, batch))


def config_labels(label_config: object) -> set[str]:
    """The ``Label`` values under ``BrushLabels`` tags of a labeling config XML."""
    from xml.etree import ElementTree

    if not isinstance(label_config, str) or len(label_config) > 16 * 1024 * 1024:
        return set()
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError:
        return set()
    return {str(label.get("value")) for tag in root.iter("BrushLabels")
            for label in tag.iter("Label")}


def run_review(config: ReviewConfig) -> ReviewOutcome:
    """Pick the images to review, write the files and, when asked, import them.

    Raises:
        ReviewError, LabelStudioError, pipeline.audit.AuditError: one-line input problems.
    """
    labels = open_labels(config.labels, config.storage_options)
    studio = _connect(config) if config.label_studio_url else None  # fail before any work
    record = read_reviewed(config.out_dir, config.storage_options)
    exclude = reviewed_ids(record) if config.exclude_reviewed else set()
    rows = iter_label_rows(config.labels, config.storage_options, columns=ROW_COLUMNS)
    items = top_k(rows, config.top, config.by, len(labels.categories), config.seed, exclude)
    refs, images = _image_refs(items, config, _io_record(config))
    seed = _random_weights(config)
    version = model_version(labels.vocabulary_hash, seed)
    sendable = [i for i in items if i.image_id in refs]
    tasks = [build_task(item, rank, refs[item.image_id], labels.categories, version)
             for rank, item in enumerate(sendable, start=1)]
    files = _write_files(config, labels.categories, items, tasks, images, seed)
    outcome = ReviewOutcome(items, files, images["missing"])
    fs, root = open_uri(config.out_dir, config.storage_options)
    if studio is None:
        record["batches"].append(_batch_record(config, sendable, None, seed))
        _write(fs, f"{root}/{REVIEWED}", json.dumps(record, indent=1))
        return outcome
    entry = _batch_record(config, [], None, seed)
    by_id = {i.image_id: i for i in sendable}

    def recorded(project: dict, batch: list[dict]) -> None:  # after each accepted import
        if entry not in record["batches"]:
            record["batches"].append(entry)
        sent = [by_id[t["data"][ID_KEY]] for t in batch]
        entry["image_ids"] += [i.image_id for i in sent]
        entry["scores"] += [round(i.score, 6) for i in sent]
        entry["label_studio"] = _studio_record(config, project)
        _write(fs, f"{root}/{REVIEWED}", json.dumps(record, indent=1))

    outcome.project, outcome.imported = _push(*studio, config, labels.categories, tasks,
                                              recorded)
    return outcome


def model_version(vocabulary_hash: str | None, random_weights: int | None) -> str:
    """The predictions' ``model_version``: the vocabulary hash, and the random-weights seed
    when the labels did not come from the real model."""
    version = f"cass-labeler {str(vocabulary_hash or '')[:12]}".strip()
    return version if random_weights is None else f"{version} random-weights-{random_weights}"


def _random_weights(config: ReviewConfig) -> int | None:
    """The random-weights seed of the labels (run.json / categories provenance), or None."""
    try:
        return output_provenance(config.labels, config.storage_options)["random_weights"]
    except (OSError, ValueError, KeyError):
        return None


def _io_record(config: ReviewConfig) -> dict:
    """The input options of the labeling run (Parquet image and id columns), if recorded."""
    try:
        return read_run_record(config.labels, config.storage_options).get("io") or {}
    except (FileNotFoundError, ValueError):
        return {}


def _write_files(config: ReviewConfig, categories, items: list[Ranked], tasks: list[dict],
                 images: dict, random_weights: int | None) -> list[str]:
    """Write tasks, labeling config and contact sheet; returns their URIs."""
    max_pixels = images["max_pixels"]
    overlays = [overlay_png(i.row, decode_photo(images["loaded"][i.image_id], max_pixels),
                            categories) for i in items]
    sheet = render_sheet(items, overlays, config.by,
                         f"Review batch: {public_uri(config.labels)}", images["missing"],
                         random_weights)
    fs, root = open_uri(config.out_dir, config.storage_options)
    fs.makedirs(root, exist_ok=True)
    files = []
    texts = (json.dumps(tasks), labeling_config(categories), sheet)
    for name, text in zip(FILES, texts, strict=True):
        _write(fs, f"{root}/{name}", text)
        files.append(f"{public_uri(config.out_dir.rstrip('/'))}/{name}")
    return files


def _batch_record(config: ReviewConfig, sent: list[Ranked], project: dict | None,
                  random_weights: int | None) -> dict:
    return {
        "created": utc_timestamp(),
        "labels": public_uri(config.labels), "random_weights": random_weights,
        "by": config.by, "seed": config.seed, "top": config.top,
        "image_ids": [i.image_id for i in sent],
        "scores": [round(i.score, 6) for i in sent],
        "label_studio": _studio_record(config, project),
    }


def _studio_record(config: ReviewConfig, project: dict | None) -> dict | None:
    if project is None:
        return None
    return {"url": public_uri(config.label_studio_url), "project_id": project.get("id"),
            "project_title": project.get("title")}
