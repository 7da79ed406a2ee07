"""Label images with CASS on Ray: shards from object storage -> Parquet masks + presence scores.

On a cluster:  ray job submit --working-dir . -- python jobs/label.py --vocab vocab.txt \\
                   --input s3://bucket/shards/ --output s3://bucket/labels/run1
Locally (embedded Ray):  python jobs/label.py --input samples/images --output out/demo \\
                   --random-weights 0

Exit codes: 0 complete (or stopped by --limit), 2 bad configuration/input/output or the
output held by another run (nothing labelled), 3 incomplete (some shards failed; see
run.json), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from cass_engine.config import DEFAULT_PRESET, PRESETS, CassConfig
from jobs.help_text import field_defaults, given
from pipeline.config import (
    INPUT_FORMATS,
    ComputeConfig,
    ConfigError,
    EngineSpec,
    IOConfig,
    JobConfig,
    OutputPolicy,
    storage_options_argument,
)
from pipeline.plan import StartupError
from pipeline.record import TERMINATED, Terminated, is_termination
from pipeline.stub import StubOptions
from schemas.uris import public_text

EXIT_BAD_CONFIG = 2


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
    d = field_defaults(IOConfig).__getitem__
    group.add_argument("--input", required=True, help="input URI: a prefix/directory, a glob "
                       "or one shard file (s3://, gs://, local path, memory://)")
    group.add_argument("--output", required=True, help="output URI prefix; gets run.json, "
                       "_lease.json while a run writes it, labels/<shard>.<run>-<n>.parquet "
                       "and _done/<shard>.json (names the table that is in the output)")
    group.add_argument("--format", choices=INPUT_FORMATS,
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
                       f"(default: {d('storage_options')})")
    group.add_argument("--max-image-pixels", type=int,
                       help="images with more pixels become 'too_large' error rows "
                       f"(default: {d('max_image_pixels')})")
    group.add_argument("--limit", type=int, help="label at most N images (smoke runs; "
                       "default: all)")
    group.add_argument("--overwrite", action="store_true", default=None,
                       help="replace an output labelled with another vocabulary, config, "
                       "input or weights; an output that matches is resumed, not replaced "
                       "(default: refuse)")
    p = field_defaults(OutputPolicy).__getitem__
    group.add_argument("--wait-for-lease", type=float, metavar="SECONDS",
                       help="when another run is writing the output, wait this long for it "
                       f"(default: {p('wait_for_lease_s'):g}: exit 2 at once, naming the other "
                       "run)")
    group.add_argument("--lease-ttl", type=float, metavar="SECONDS",
                       help="the output's lease expires this long after its last renewal; "
                       f"another run takes an expired lease over (default: {p('lease_ttl_s'):g})")
    group.add_argument("--verify", action="store_true", default=None,
                       help="on resume, also check the SHA-256 of every labelled shard (reads "
                       "the whole output; default: existence and size)")
    group.add_argument("--output-is-shared", action="store_true", default=None,
                       help="a local --output path is the same shared file system on every "
                       "node of a multi-node cluster (default: refuse a local output there)")
    group.add_argument("--confidence", action="store_true", default=None,
                       help="store each image's per-pixel confidence (8-bit PNG per row, "
                       "for --ignore-below/--thresholds exports; default: off)")


def _engine_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--vocab", help="vocabulary file: one class per line, synonyms "
                       "separated by ', ' (default: the preset's bundled vocabulary)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help=f"CASS hyperparameter preset (default: {DEFAULT_PRESET})")
    group.add_argument("--clip-weights", help="OpenAI CLIP ViT-B/16 checkpoint, path or URL "
                       "(staged once per node; default: official weights from the hub)")
    group.add_argument("--dino-weights", help="DINO ViT-B/8 checkpoint, path or URL "
                       "(default: official weights from the hub)")
    group.add_argument("--random-weights", type=int, metavar="SEED",
                       help="seeded random weights instead of checkpoints (smoke runs only; "
                       "recorded in the output; default: off)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help=f"engine device (default: {field_defaults(EngineSpec)['device']}: "
                       "the actor's GPU if it has one, else CPU)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"],
                       help="engine dtype (default: float32 on CPU, the faithful path; float16 "
                       "on GPU); auto: bfloat16 on CPUs with native bf16, float16 on GPUs")
    group.add_argument("--engine", choices=["cass", "stub"],
                       help="'stub' is a fast fake engine for pipeline smoke tests "
                       "(default: cass)")


def _compute_arguments(group: argparse._ArgumentGroup) -> None:
    d = field_defaults(ComputeConfig).__getitem__
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
    group.add_argument("--cpu-processes", type=_cpu_processes, metavar="N|auto",
                       help="decode and encode in N processes per actor instead of its threads "
                       "(past the GIL: for many-core GPU nodes); auto = the actor's CPUs minus "
                       f"one (default: {d('cpu_processes')}, threads)")
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


def _cpu_processes(value: str) -> int | str:
    """``--cpu-processes``: a count >= 0, or ``auto``."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'auto', got {value!r}")
    return count


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """Typed job configuration from parsed arguments.

    Raises:
        ConfigError, ValueError: invalid values.
    """
    io = IOConfig(local_path(args.input, "--input"), local_path(args.output, "--output"),
                  **given(dict(
        input_format=args.format, images_per_shard=args.images_per_shard,
        image_column=args.image_column, id_column=args.id_column,
        storage_options=args.storage_options, max_image_pixels=args.max_image_pixels,
        limit=args.limit, overwrite=args.overwrite, confidence=args.confidence)))
    compute = ComputeConfig(**given(dict(
        actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        shards_per_actor=args.shards_per_actor, decode_threads=args.decode_threads,
        cpu_processes=args.cpu_processes,
        max_attempts=args.max_attempts, progress_interval_s=args.progress_interval,
        startup_timeout_s=args.startup_timeout)))
    if args.stall_timeout is not None:  # 0 disables the watchdog
        if args.stall_timeout < 0:
            raise ConfigError("--stall-timeout must be >= 0 (0 disables the watchdog)")
        compute = dataclasses.replace(compute, stall_timeout_s=args.stall_timeout or None)
    policy = OutputPolicy(**given(dict(
        wait_for_lease_s=args.wait_for_lease, lease_ttl_s=args.lease_ttl, verify=args.verify,
        output_is_shared=args.output_is_shared)))
    return JobConfig(io, compute, _engine_spec(args, io), policy)


def submitted_job_id() -> str | None:
    """The Ray job submission id when this process runs under ``ray job submit`` (its working
    directory is then Ray's temporary copy of the checkout), else None."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        config = {}
    found = (config.get("metadata") or {}).get("job_submission_id")
    if found:
        return str(found)
    return "unknown" if "/runtime_resources/working_dir_files/" in os.getcwd() else None


def local_path(uri: str, option: str) -> str:
    """An absolute path for a relative local path (resolved against the directory the command
    runs in); URIs with a scheme and absolute paths unchanged.

    Raises:
        ConfigError: a relative ``--output`` under ``ray job submit``, where the working
            directory is Ray's temporary copy of the checkout.
    """
    if "://" in uri or os.path.isabs(uri) or not uri:
        return uri
    job = submitted_job_id()
    if job is not None and option == "--output":
        raise ConfigError(
            f"{option} {uri!r} is a relative path, and under `ray job submit` (job {job}) it "
            "would land in Ray's temporary copy of the working directory, deleted with the "
            "job: give an object-store URI (s3://, gs://) or an absolute path on shared "
            "storage (with --output-is-shared on a multi-node cluster)")
    return os.path.abspath(uri)


def _engine_spec(args: argparse.Namespace, io: IOConfig) -> EngineSpec:
    config = CassConfig.from_preset(args.preset or DEFAULT_PRESET,
                                    **given({"vocabulary_path": args.vocab}))
    return EngineSpec(config, **given(dict(
        clip_weights=args.clip_weights, dino_weights=args.dino_weights,
        random_weights=args.random_weights, device=args.device, dtype=args.dtype,
        storage_options=io.storage_options,
        stub=StubOptions() if args.engine == "stub" else None)))


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


def _terminate(signum: int, frame: object) -> None:
    TERMINATED.set()
    raise Terminated(f"signal {signum}")


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
    from pipeline.runner import abandon, execute_plan, exit_code_of

    started, plan = False, None
    TERMINATED.clear()
    previous = _handle_sigterm()
    try:
        preflight(job.io, (job.engine.clip_weights, job.engine.dino_weights))
        if cluster_address(args.address) is None:  # workers on this machine: same cache
            check_hub_weights(job.engine)
        plan = plan_job(job)
        started = init_ray(args.address)
        _handle_sigterm()  # again: ray.init installs its own SIGTERM handler (plain exit)
        return execute_plan(plan).exit_code
    except StartupError as exc:
        abandon(plan, "failed", EXIT_BAD_CONFIG, str(exc))
        print(f"label.py: error: {public_text(str(exc))}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except KeyboardInterrupt as exc:
        abandon(plan, "interrupted", exit_code_of(exc))
        what = "terminated" if is_termination(exc) else "interrupted"
        print(f"label.py: {what}; rerun the same command to resume", file=sys.stderr)
        return exit_code_of(exc)
    except Exception as exc:  # an unexpected failure still ends the run and frees the output
        abandon(plan, "failed", 1, f"{type(exc).__name__}: {public_text(str(exc))}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if started:
            import ray

            ray.shutdown()


def _handle_sigterm() -> object:
    """SIGTERM (kill, Kubernetes, Slurm) raises :class:`Terminated`, handled like Ctrl-C;
    returns the previous handler (None when not in the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
