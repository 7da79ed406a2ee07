"""Label images with CASS on Ray: shards from object storage -> Parquet masks + presence scores.

On a cluster:  ray job submit --working-dir . -- python jobs/label.py --vocab vocab.txt \\
                   --input s3://bucket/shards/ --output s3://bucket/labels/run1
Locally (embedded Ray):  python jobs/label.py --input samples/images --output out/demo \\
                   --random-weights 0

Exit codes: 0 complete (or stopped by --limit), 2 bad configuration/input/output (nothing
labelled), 3 incomplete (some shards failed; see run.json), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from pipeline.config import (
    ComputeConfig,
    ConfigError,
    IOConfig,
    public_text,
    storage_options_argument,
)
from pipeline.engine import EngineSpec
from pipeline.plan import JobConfig, StartupError
from pipeline.stub import StubOptions

EXIT_BAD_CONFIG = 2


def _default(cls: type, name: str) -> object:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def build_parser() -> argparse.ArgumentParser:
    """The job's arguments; every default is the config dataclasses' default."""
    parser = argparse.ArgumentParser(
        prog="label.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    _io_arguments(parser.add_argument_group("input and output"))
    _engine_arguments(parser.add_argument_group("engine"))
    _compute_arguments(parser.add_argument_group("compute"))
    return parser


def _io_arguments(group: argparse._ArgumentGroup) -> None:
    d = lambda name: _default(IOConfig, name)  # noqa: E731
    group.add_argument("--input", required=True, help="input URI: a prefix/directory, a glob "
                       "or one shard file (s3://, gs://, local path, memory://)")
    group.add_argument("--output", required=True, help="output URI prefix; gets run.json, "
                       "labels/<shard>.parquet and _done/<shard>.json")
    group.add_argument("--format", choices=["auto", "webdataset", "parquet", "images"],
                       help=f"input shard format (default: {d('input_format')}: detect from "
                       "file extensions)")
    group.add_argument("--images-per-shard", type=int,
                       help=f"image files per shard for plain image inputs "
                       f"(default: {d('images_per_shard')})")
    group.add_argument("--image-column", help="image-bytes column of Parquet shards "
                       f"(default: {d('image_column')})")
    group.add_argument("--id-column", help="key column of Parquet shards (default: row number)")
    group.add_argument("--storage-options", type=storage_options_argument,
                       metavar="JSON|@FILE",
                       help="fsspec filesystem keyword arguments for input, output and weight "
                       "URLs: @FILE reads them from a JSON file (keeps secrets off the command "
                       'line), e.g. {"endpoint_url": "http://127.0.0.1:8333", "key": "...", '
                       '"secret": "..."}; the AWS_* environment variables also work '
                       "(default: {})")
    group.add_argument("--max-image-pixels", type=int,
                       help="images with more pixels become 'too_large' error rows "
                       f"(default: {d('max_image_pixels')})")
    group.add_argument("--limit", type=int, help="label at most N images (smoke runs; "
                       "default: all)")
    group.add_argument("--overwrite", action="store_true", default=None,
                       help="replace an output labelled with another vocabulary or config "
                       "(default: refuse)")


def _engine_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--vocab", help="vocabulary file: one class per line, synonyms "
                       "separated by ', ' (default: the preset's bundled vocabulary)")
    group.add_argument("--preset", help="CASS hyperparameter preset (default: coco_stuff)")
    group.add_argument("--clip-weights", help="OpenAI CLIP ViT-B/16 checkpoint, path or URL "
                       "(staged once per node; default: official weights from the hub)")
    group.add_argument("--dino-weights", help="DINO ViT-B/8 checkpoint, path or URL "
                       "(default: official weights from the hub)")
    group.add_argument("--random-weights", type=int, metavar="SEED",
                       help="seeded random weights instead of checkpoints (smoke runs only; "
                       "recorded in the output; default: off)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help=f"engine device (default: {_default(EngineSpec, 'device')}: the "
                       "actor's GPU if it has one, else CPU)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="autocast dtype (default: float32 on CPU, float16 on GPU)")
    group.add_argument("--engine", choices=["cass", "stub"], default="cass",
                       help="'stub' is a fast fake engine for pipeline smoke tests "
                       "(default: cass)")


def _compute_arguments(group: argparse._ArgumentGroup) -> None:
    d = lambda name: _default(ComputeConfig, name)  # noqa: E731
    group.add_argument("--actors", type=int, help="engine actors (default: one per "
                       "--gpus-per-actor GPUs in the cluster, or 1 CPU actor without GPUs)")
    group.add_argument("--gpus-per-actor", type=float,
                       help=f"GPUs per actor; 0 forces CPU actors (default: {d('gpus_per_actor')})")
    group.add_argument("--cpus-per-actor", type=float,
                       help="CPUs per actor (default: the node's CPUs shared evenly)")
    group.add_argument("--batch-size", type=int,
                       help=f"images per engine call (default: {d('batch_size')})")
    group.add_argument("--shards-per-actor", type=int,
                       help=f"shards in flight per actor (default: {d('shards_per_actor')})")
    group.add_argument("--decode-threads", type=int,
                       help=f"decode/encode threads per actor (default: {d('decode_threads')})")
    group.add_argument("--max-attempts", type=int,
                       help=f"attempts per shard before it is reported failed "
                       f"(default: {d('max_attempts')})")
    group.add_argument("--startup-timeout", type=float, metavar="SECONDS",
                       help="give up when the workers have not started (weights loaded, text "
                       f"embeddings computed) after this long (default: "
                       f"{d('startup_timeout_s'):g})")
    group.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                       help="restart a worker when a shard has finished no image for this "
                       "long, and retry the shard; 0 disables "
                       f"(default: {d('stall_timeout_s'):g})")
    group.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS; "
                       "without either, a private local Ray listening on 127.0.0.1 only)")
    group.add_argument("--progress-interval", type=float,
                       help=f"seconds between progress lines "
                       f"(default: {d('progress_interval_s')})")


def _given(**values: object) -> dict:
    """Only the options the user set (so dataclass defaults apply to the rest)."""
    return {k: v for k, v in values.items() if v is not None}


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """Typed job configuration from parsed arguments.

    Raises:
        ConfigError, ValueError: invalid values.
    """
    io = IOConfig(args.input, args.output, **_given(
        input_format=args.format, images_per_shard=args.images_per_shard,
        image_column=args.image_column, id_column=args.id_column,
        storage_options=args.storage_options, max_image_pixels=args.max_image_pixels,
        limit=args.limit, overwrite=args.overwrite))
    compute = ComputeConfig(**_given(
        actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        shards_per_actor=args.shards_per_actor, decode_threads=args.decode_threads,
        max_attempts=args.max_attempts, progress_interval_s=args.progress_interval,
        startup_timeout_s=args.startup_timeout))
    if args.stall_timeout is not None:  # 0 disables the watchdog
        if args.stall_timeout < 0:
            raise ConfigError("--stall-timeout must be >= 0 (0 disables the watchdog)")
        compute = dataclasses.replace(compute, stall_timeout_s=args.stall_timeout or None)
    return JobConfig(io, compute, _engine_spec(args, io))


def _engine_spec(args: argparse.Namespace, io: IOConfig) -> EngineSpec:
    from cass_engine.config import DEFAULT_PRESET, CassConfig

    config = CassConfig.from_preset(args.preset or DEFAULT_PRESET,
                                    **_given(vocabulary_path=args.vocab))
    return EngineSpec(config, **_given(
        clip_weights=args.clip_weights, dino_weights=args.dino_weights,
        random_weights=args.random_weights, device=args.device, dtype=args.dtype,
        storage_options=io.storage_options,
        stub=StubOptions() if args.engine == "stub" else None))


def init_ray(address: str | None = None) -> bool:
    """Join the cluster at ``--address``/``RAY_ADDRESS``, else start a private local Ray
    bound to 127.0.0.1 (see :mod:`pipeline.cluster`).

    Returns:
        True when this call started Ray (and the caller should shut it down).
    """
    from pipeline.cluster import init_ray as start

    return start(address)


class _OneLineFormatter(logging.Formatter):
    """Log records as one line each: storage libraries log whole tracebacks for errors that
    the job reports itself, with context, a moment later."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"[{record.name}] {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {exc})"
        return public_text(" ".join(text.split()))[:1000]


def _configure_logging() -> None:
    """Warnings and errors of the job and its libraries on stderr, one line each."""
    root = logging.getLogger()
    if root.handlers:  # embedded in a program that configured logging itself
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        job = job_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"label.py: error: {public_text(str(exc))}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from pipeline.cluster import cluster_address
    from pipeline.plan import plan_job
    from pipeline.preflight import check_hub_weights, preflight
    from pipeline.runner import execute_plan

    started = False
    try:
        preflight(job.io, (job.engine.clip_weights, job.engine.dino_weights))
        if cluster_address(args.address) is None:  # workers on this machine: same cache
            check_hub_weights(job.engine)
        plan = plan_job(job)
        started = init_ray(args.address)
        return execute_plan(plan).exit_code
    except StartupError as exc:
        print(f"label.py: error: {public_text(str(exc))}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except KeyboardInterrupt:
        print("label.py: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
