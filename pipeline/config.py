"""Typed, frozen configuration of a labeling job. Defaults live here; the CLI only overrides.

Four groups, validated on construction (an invalid value raises :class:`ConfigError`):

- :class:`IOConfig`: where images come from and where labels go.
- :class:`ComputeConfig`: actors, GPUs, batch size, in-flight bounds, retries.
- :class:`EngineSpec`: a picklable recipe for the engine, with the vocabulary parsed once
  (on the driver) and its hash: workers never open the vocabulary file.
- :class:`OutputPolicy`: leases, resume verification, shared local outputs.

:class:`JobConfig` holds the four. The argparse types of ``--storage-options`` and the
inline-JSON-or-location flags (``--category-map``) live here too, so that every job parses
them alike.
"""

from __future__ import annotations

import json
import os
from argparse import ArgumentTypeError
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cass_engine.staging import check_weight_choice
from cass_engine.vocabulary import Vocabulary
from schemas.uris import public_uri, redact

if TYPE_CHECKING:  # pragma: no cover - the stub's options are only type-annotated here
    from .stub import StubOptions

InputFormat = Literal["auto", "webdataset", "parquet", "images"]
INPUT_FORMATS = ("auto", "webdataset", "parquet", "images")

#: Default decompression-bomb limit (pixels); about 64 megapixels (8000 x 8000).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

#: Node-local directory for staged weights.

#: Time to live of a run's lease on its output (seconds; renewed every quarter of it).
DEFAULT_LEASE_TTL_S = 120.0


@dataclass(frozen=True)
class IOConfig:
    """Input and output.

    Attributes:
        input_uri: fsspec URI of the input: a prefix/directory, a glob, or one shard file.
        output_uri: fsspec URI of the output prefix.
        input_format: ``auto`` detects from file extensions.
        images_per_shard: image files per shard for plain image prefixes.
        image_column: image-bytes column of Parquet shards (binary, or struct with ``bytes``).
        id_column: optional key column of Parquet shards (default: row number).
        storage_options: fsspec keyword arguments for input and output filesystems
            (credentials are never logged or recorded).
        max_image_pixels: images with more pixels are error rows (``too_large``).
        limit: label at most this many images (smoke runs); None = all.
        overwrite: allow a different vocabulary/config to replace an existing output.
        confidence: store each image's per-pixel confidence map in the rows (schema 1.1
            ``confidence`` column; off by default: it costs several times the masks).
    """

    input_uri: str
    output_uri: str
    input_format: InputFormat = "auto"
    images_per_shard: int = 1000
    image_column: str = "image"
    id_column: str | None = None
    storage_options: Mapping = field(default_factory=dict)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    limit: int | None = None
    overwrite: bool = False
    confidence: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.input_uri), "input_uri is required")
        _check(bool(self.output_uri), "output_uri is required")
        _check(self.input_format in INPUT_FORMATS,
               f"input_format must be one of {', '.join(INPUT_FORMATS)}")
        _check(self.images_per_shard >= 1, "images_per_shard must be >= 1")
        _check(self.max_image_pixels >= 1, "max_image_pixels must be >= 1")
        _check(self.limit is None or self.limit >= 1, "limit must be >= 1")
        _check(isinstance(self.storage_options, Mapping), "storage_options must be a mapping")
        _check(self.input_uri.rstrip("/") != self.output_uri.rstrip("/"),
               "input and output must differ")

    def public_dict(self) -> dict:
        """JSON view with credentials redacted, for run records and logs."""
        return {
            "input_uri": public_uri(self.input_uri), "output_uri": public_uri(self.output_uri),
            "input_format": self.input_format, "images_per_shard": self.images_per_shard,
            "image_column": self.image_column, "id_column": self.id_column,
            "storage_options": redact(self.storage_options),
            "max_image_pixels": self.max_image_pixels, "limit": self.limit,
            "overwrite": self.overwrite, "confidence": self.confidence,
        }


@dataclass(frozen=True)
class ComputeConfig:
    """Compute resources and flow control.

    Attributes:
        actors: number of engine actors; None = one per ``gpus_per_actor`` GPUs in the
            cluster, or one CPU actor when the cluster has no GPUs.
        gpus_per_actor: GPUs reserved by each actor (0 forces CPU actors).
        cpus_per_actor: CPUs reserved by each actor; None = the node's CPUs shared evenly.
        batch_size: images per engine call.
        shards_per_actor: shards in flight per actor (2 overlaps one shard's decoding and
            writing with the other's engine work).
        decode_threads: threads decoding images inside each actor (with ``cpu_processes``:
            threads reading images and handing them to the processes).
        cpu_processes: decode and RLE-encode in this many processes per actor instead of
            in the actor's threads (past its GIL: see :mod:`pipeline.cpu_pool`); 0 = threads;
            ``auto`` = the actor's CPUs minus one (0 below 3 CPUs).
        prefetch_batches: decoded batches queued ahead of the engine, per shard.
        max_attempts: attempts per shard before it is reported as failed.
        progress_interval_s: seconds between progress lines.
        startup_timeout_s: seconds the workers may take to start (weights staged and loaded,
            text embeddings computed) before the job gives up with a startup error.
        stall_timeout_s: a shard in which no image has finished for this many seconds is
            declared stalled: its worker is killed and replaced, and the shard retried
            (counts as an attempt). None disables the watchdog.
    """

    actors: int | None = None
    gpus_per_actor: float = 1.0
    cpus_per_actor: float | None = None
    batch_size: int = 8
    shards_per_actor: int = 2
    decode_threads: int = 2
    cpu_processes: int | Literal["auto"] = 0
    prefetch_batches: int = 2
    max_attempts: int = 3
    progress_interval_s: float = 10.0
    startup_timeout_s: float = 1800.0
    stall_timeout_s: float | None = 900.0

    def __post_init__(self) -> None:
        _check(self.actors is None or self.actors >= 1, "actors must be >= 1")
        _check(self.gpus_per_actor >= 0, "gpus_per_actor must be >= 0")
        _check(self.cpus_per_actor is None or self.cpus_per_actor > 0,
               "cpus_per_actor must be > 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.shards_per_actor >= 1, "shards_per_actor must be >= 1")
        _check(self.decode_threads >= 1, "decode_threads must be >= 1")
        _check(self.cpu_processes == "auto" or (isinstance(self.cpu_processes, int)
                                                and self.cpu_processes >= 0),
               "cpu_processes must be >= 0 or 'auto'")
        _check(self.prefetch_batches >= 1, "prefetch_batches must be >= 1")
        _check(self.max_attempts >= 1, "max_attempts must be >= 1")
        _check(self.progress_interval_s > 0, "progress_interval_s must be > 0")
        _check(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        _check(self.stall_timeout_s is None or self.stall_timeout_s > 0,
               "stall_timeout_s must be > 0 (or None to disable)")


@dataclass(frozen=True)
class EngineSpec:
    """How to build the engine, and the vocabulary it labels with.

    The vocabulary is parsed once, when the spec is made (on the driver): ``vocabulary`` and
    ``vocabulary_hash`` travel with the pickled spec, so workers never open the vocabulary
    file (one edited since, another copy on another node or a path that exists only on the
    head node changes nothing). ``dataclasses.replace`` parses the new config's vocabulary.

    Attributes:
        config: the engine's ``CassConfig`` (preset values, vocabulary file).
        clip_weights, dino_weights: weight paths or URLs (staged once per node); None uses
            the engine's default (official weights through the hubs).
        random_weights: seed for random weights (smoke runs; recorded in the output).
        device: ``auto`` (the actor's GPU if it has one, else CPU), ``cpu`` or ``cuda``.
        dtype: engine dtype name (``float16``, ``bfloat16``, ``float32``, ``auto``) or None
            for the engine's default (float32 on CPU, float16 on GPUs).
        storage_options: fsspec options for weight URLs (never recorded).
        stub: build the fast stub engine instead (tests, benchmarks).
        cache_dir: the engine's cache root on each node (staged weights in ``weights/``,
            text embeddings in ``text/``); None: ``$CASS_CACHE_DIR`` or
            ``~/.cache/cass_engine`` of the worker.
        vocabulary: the parsed vocabulary (set on construction from ``config``).
        vocabulary_hash: its ``content_hash()``, recorded in the run record and checked by
            every worker against what it uses.
    """

    config: Any
    clip_weights: str | None = None
    dino_weights: str | None = None
    random_weights: int | None = None
    device: str = "auto"
    dtype: str | None = None
    storage_options: Mapping = field(default_factory=dict)
    stub: StubOptions | None = None
    cache_dir: str | None = None
    vocabulary: Vocabulary = field(init=False, repr=False)
    vocabulary_hash: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            check_weight_choice(self.clip_weights, self.dino_weights, self.random_weights)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
        _check(self.dtype in (None, "float32", "float16", "bfloat16", "auto"),
               "dtype must be float32, float16, bfloat16 or auto")
        try:
            vocabulary = self.config.load_vocabulary()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the vocabulary: {exc}") from None
        object.__setattr__(self, "vocabulary", vocabulary)
        object.__setattr__(self, "vocabulary_hash", vocabulary.content_hash())

    def identity(self) -> dict:
        """What determines the labels, as JSON (for run records and the resume check).

        The vocabulary's display names (``[name]`` lines) are part of it when it has any:
        they name the output categories, so shards of one output cannot disagree on them."""
        display = ({"display_names": list(self.vocabulary.class_names)}
                   if self.vocabulary.display_names else {})
        return {
            **display,
            "engine": "stub" if self.stub is not None else "cass",
            "config": self.config.to_dict(),
            "clip_weights": public_uri(self.clip_weights),
            "dino_weights": public_uri(self.dino_weights),
            "random_weights": self.random_weights,
            "dtype": self.dtype,
            "stub": self.stub.to_dict() if self.stub is not None else None,
        }


@dataclass(frozen=True)
class OutputPolicy:
    """How a run treats its output.

    Attributes:
        wait_for_lease_s: seconds to wait for another run's lease on the output (0: stop at
            once with exit code 2, naming the holder).
        lease_ttl_s: time to live of this run's lease (renewed every quarter of it); another
            run takes an expired lease over.
        verify: on resume, also compare every certified labels object's SHA-256 (else:
            existence and size).
        output_is_shared: the user vouches that a local output path is the same shared
            storage on every node of a multi-node cluster.
    """

    wait_for_lease_s: float = 0.0
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    verify: bool = False
    output_is_shared: bool = False

    def __post_init__(self) -> None:
        _check(self.wait_for_lease_s >= 0 and self.lease_ttl_s > 0,
               "wait_for_lease_s must be >= 0 and lease_ttl_s > 0")


@dataclass(frozen=True)
class JobConfig:
    """A whole labeling job."""

    io: IOConfig
    compute: ComputeConfig
    engine: EngineSpec
    policy: OutputPolicy = field(default_factory=OutputPolicy)


def storage_options_argument(text: str) -> dict:
    """argparse type of ``--storage-options``: a JSON object, or ``@FILE`` naming a file
    that holds one (so that secrets stay off the command line, ``ps`` and Ray's job table).
    Errors never echo the value (argparse would, for a ValueError), since it may hold
    credentials."""
    source = "JSON"
    if text.startswith("@"):
        path = os.path.expanduser(text[1:])
        source = f"the JSON in {path}"
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ArgumentTypeError(f"cannot read the storage options file {path}: "
                                    f"{exc.strerror or type(exc).__name__}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ArgumentTypeError(
            f"{source} is not valid JSON ({exc.msg} at character {exc.pos}; the value is not "
            "shown because it may hold credentials)") from None
    if not isinstance(value, dict):
        raise ArgumentTypeError("must be a JSON object, e.g. '{\"key\": \"...\"}'")
    return value


def is_inline_json(text: str) -> bool:
    """Whether a flag value that takes a location or inline JSON (``--category-map``) is
    inline JSON: it starts with ``{`` (after blanks); anything else is a path or URL."""
    return text.lstrip().startswith("{")


class ConfigError(ValueError):
    """A job configuration value is invalid."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
