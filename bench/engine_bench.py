"""Engine throughput: seconds per image for a 336x448 photograph, engine only.

    python bench/engine_bench.py --preset coco_stuff [--preset voc21] [--device cpu|cuda]
        [--random-weights SEED | --clip-weights F --dino-weights F] [--batch-size B]
        [--dtype float16|bfloat16|float32|auto ...] [--repeats N] [--baseline]

Text embeddings are computed (or read from the cache) before timing. ``--dtype`` may be given
several times: each preset is then timed in each dtype in the same run, and the speed of each
dtype relative to the first is printed (``--dtype float32 --dtype bfloat16``: the bf16 speed-up
measured under the same machine load; the engines are timed in turns, and each figure is the
fastest of ``--repeats`` rounds). ``--baseline`` also
times the literal one-crop-at-a-time formulation in ``tests/support/reference_cass.py`` (the
reference data path: batch size 1, whole image re-encoded per crop, N x N eigensolves) on the
same machine in the same run and prints the speed ratio. ``--text-only`` times the text
embeddings alone (computed, not read from the cache; ``s_per_image`` is then the text
setup time). The last line is
``s_per_image=X images_per_s=Y peak_rss_gb=Z`` (plus ``peak_gpu_gb=W`` on CUDA) for the last
preset.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data

from cass_engine import CassConfig, build_segmenter
from pipeline.memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]


def photo_336x448() -> np.ndarray:
    """A real photograph at 336x448 (no resize needed for 336 presets)."""
    coffee = data.coffee()  # 400x600
    tensor = torch.from_numpy(coffee[25:385, 20:500].copy()).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(tensor, size=(336, 448), mode="bilinear",
                                          align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def peak_rss_gb() -> float:
    return peak_rss_bytes() / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(seg, images: list) -> float:
    """Seconds per image of one ``segment`` call on ``images``."""
    sync(seg.device)
    start = time.perf_counter()
    seg.segment(images, return_logits=False, return_probs=False)
    sync(seg.device)
    return (time.perf_counter() - start) / len(images)


def time_baseline(seg, image: np.ndarray) -> float:
    """Seconds for one image through the literal reference formulation (CPU, fp32)."""
    spec = importlib.util.spec_from_file_location("reference_cass",
                                                  ROOT / "tests" / "support" / "reference_cass.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    emb = seg.text_embeddings
    chw = torch.from_numpy(image).permute(2, 0, 1)
    clip, dino = seg.clip.float().cpu(), seg.dino.float().cpu()
    start = time.perf_counter()
    ref.reference_probs(clip, dino, seg.config, emb.queries, emb.groups(seg.config.h_threshold),
                        emb.vocabulary.query_to_class, chw, tuple(chw.shape[-2:]))
    return time.perf_counter() - start


def build_engine(args: argparse.Namespace, preset: str, device: torch.device,
                 dtype: str | None):
    """One engine with its vocabulary set; prints the text setup time."""
    seg = build_segmenter(CassConfig.from_preset(preset), clip_weights=args.clip_weights,
                          dino_weights=args.dino_weights, random_weights=args.random_weights,
                          device=device, dtype=dtype)
    seg.crop_batch_size = max(seg.crop_batch_size, 6 * args.batch_size)
    t0 = time.perf_counter()
    seg.set_vocabulary(use_cache=not args.text)
    seg.text_setup_s = time.perf_counter() - t0
    print(f"[{preset}] vocabulary: {seg.vocabulary.num_classes} classes, "
          f"{seg.vocabulary.num_queries} queries, text setup {seg.text_setup_s:.1f}s"
          f"{' (computed, cache not read)' if args.text else ''} "
          f"dtype={seg.weights_info['dtype']}", flush=True)
    return seg


def bench_preset(args: argparse.Namespace, preset: str, device: torch.device,
                 image: np.ndarray) -> list[tuple[str, float]]:
    """Time every requested dtype on one preset, interleaved; returns (dtype, s/image).

    The engines are built first, then timed in turns (one batch each per round, after one
    warm-up batch each), so that machine-load drift hits every dtype alike; the figure is
    the fastest round (the least disturbed by other load), the median is printed too.
    """
    engines = [build_engine(args, preset, device, dtype) for dtype in args.dtype or [None]]
    if args.text_only:
        return [(seg.weights_info["dtype"], seg.text_setup_s) for seg in engines]
    images = [image] * args.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds: list[list[float]] = [[] for _ in engines]
    for seg in engines:
        time_batch(seg, images)
    for _ in range(args.repeats):
        for times, seg in zip(rounds, engines, strict=True):
            times.append(time_batch(seg, images))
    out = []
    for seg, times in zip(engines, rounds, strict=True):
        s, median = min(times), float(np.median(times))
        gpu = (f" peak_gpu_gb={torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f}"
               if device.type == "cuda" else "")
        print(f"[{preset}] 336x448 batch={args.batch_size} dtype={seg.weights_info['dtype']} "
              f"device={device}: s_per_image={s:.4f} images_per_s={1 / s:.2f} "
              f"median_s={median:.4f} peak_rss_gb={peak_rss_gb():.2f}{gpu}", flush=True)
        if args.baseline:
            base = time_baseline(seg, image)
            print(f"[{preset}] reference formulation: {base:.2f} s/image; engine is "
                  f"{base / s:.1f}x faster")
        out.append((seg.weights_info["dtype"], s))
    del engines
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", default=None,
                   help="preset(s) to time (default: coco_stuff and voc21)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED")
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--dino-weights", default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", action="append", default=None,
                   choices=["float16", "bfloat16", "float32", "auto"],
                   help="engine dtype; repeat to compare dtypes in one run")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--text", action="store_true",
                   help="compute the text embeddings without reading the cache (timed)")
    p.add_argument("--text-only", action="store_true",
                   help="time only the text embeddings (implies --text)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the literal reference formulation (slow)")
    args = p.parse_args()
    args.text = args.text or args.text_only
    if args.random_weights is None and not (args.clip_weights and args.dino_weights):
        args.random_weights = 0
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = photo_336x448()
    line = ""
    for preset in args.preset or ["coco_stuff", "voc21"]:
        figures = bench_preset(args, preset, device, image)
        (first, base), (_, s) = figures[0], figures[-1]
        for name, other in figures[1:]:
            print(f"[{preset}] {name} is {base / other:.2f}x {first} (same run, interleaved)")
        line = f"s_per_image={s:.4f} images_per_s={1 / s:.2f} peak_rss_gb={peak_rss_gb():.2f}"
        if device.type == "cuda":
            line += f" peak_gpu_gb={torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f}"
    print(line)


if __name__ == "__main__":
    main()
