"""Peak worker memory per shard size: streamed rows (now) versus all rows held (before).

    python bench/shard_memory.py --sizes 10000 100000 300000

For each size, writes one WebDataset tar shard of that many tiny PNG thumbnails (16 x 16,
a few distinct ones) to a temporary directory, then labels it in a fresh process with one
:class:`pipeline.worker.LabelWorker` (stub engine, no Ray) and prints that process's peak
resident memory. ``stream`` is what the job does (rows streamed to a Parquet spool file in
row groups, tar headers dropped); ``hold`` is the baseline measured in the same run: the
same worker made to collect every row in a list and build one Parquet buffer, as the job
did before. Memory is flat when ``stream``'s peak does not grow with the shard.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _thumbnails(count: int = 8) -> list[bytes]:
    out = []
    for i in range(count):
        array = np.full((16, 16, 3), 20 + 28 * i, dtype=np.uint8)
        array[:8, :8] = 255 - 28 * i  # two classes per image: real RLE work
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def write_tar(path: Path, size: int) -> None:
    """One shard of ``size`` thumbnails (members ``000000000.png``...)."""
    thumbs = _thumbnails()
    with tarfile.open(path, "w") as archive:
        for i in range(size):
            data = thumbs[i % len(thumbs)]
            info = tarfile.TarInfo(f"{i:09d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def label_once(tar: str, out: str, mode: str) -> dict:
    """Label one shard in this process; returns images, seconds and peak RSS (bytes)."""
    from cass_engine import CassConfig
    from pipeline.config import ComputeConfig, EngineSpec, IOConfig
    from pipeline.memory import peak_rss_bytes
    from pipeline.shards import list_shards
    from pipeline.stub import StubOptions
    from pipeline.worker import LabelWorker, WorkerSpec
    from pipeline.writer import write_shard

    vocab = Path(out) / "vocab.txt"
    Path(out).mkdir(parents=True, exist_ok=True)
    vocab.write_text("sky\ntree\nroad\n")
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab))
    io_cfg = IOConfig(tar, str(Path(out) / "labels"))
    spec = WorkerSpec(EngineSpec(config, stub=StubOptions()), io_cfg,
                      ComputeConfig(batch_size=16, decode_threads=1), "bench", {})
    worker = LabelWorker(spec)
    worker.prepare(worker.compute_text_embeddings())
    shard = list_shards(io_cfg)[0]
    started = time.monotonic()
    if mode == "stream":
        record = worker.process_shard(shard)
    else:  # the old path: every row in a list, then one Parquet buffer
        from pipeline.readers import iter_raw_images

        rows = worker.label_items(shard.shard_id, iter_raw_images(shard, worker._in_fs))
        record = write_shard(worker._out_fs, worker._out_root, shard.shard_id, rows, {}, {})
    return {"images": record["num_images"], "seconds": time.monotonic() - started,
            "peak_rss": peak_rss_bytes()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--modes", nargs="+", default=["stream", "hold"],
                        choices=["stream", "hold"])
    parser.add_argument("--child", nargs=3, metavar=("TAR", "OUT", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(label_once(*args.child)))
        return 0
    with tempfile.TemporaryDirectory(prefix="cass-shard-memory-") as tmp:
        results: dict[str, dict[int, dict]] = {m: {} for m in args.modes}
        for size in args.sizes:
            tar = Path(tmp) / f"shard-{size}.tar"
            write_tar(tar, size)
            for mode in args.modes:
                run = subprocess.run(
                    [sys.executable, __file__, "--child", str(tar), f"{tmp}/{mode}-{size}",
                     mode], capture_output=True, text=True, check=True,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
                result = json.loads(run.stdout.strip().splitlines()[-1])
                results[mode][size] = result
                print(f"{mode:6s} {size:>9,d} images: peak RSS {result['peak_rss'] / 2**20:7.1f}"
                      f" MiB, {result['images'] / result['seconds']:7.0f} img/s", flush=True)
            tar.unlink()
        smallest, largest = min(args.sizes), max(args.sizes)
        for mode, by_size in results.items():
            ratio = by_size[largest]["peak_rss"] / by_size[smallest]["peak_rss"]
            print(f"{mode}: peak RSS at {largest:,d} / at {smallest:,d} images = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
