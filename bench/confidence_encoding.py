"""Measure encodings of the per-pixel confidence map: bytes per image and reconstruction error.

    python bench/confidence_encoding.py [--preset voc21] [--scales 1 2 4 8] [--contrast 1 10 30]

Runs the engine (the test fixtures' seeded random backbones: same architecture and decision
as real weights; the confidence is the probability of each pixel's label) on real
photographs from ``skimage.data`` and, for each storage scale (1 = full size, s = 1/s per
side, bilinear upsampling), prints the mean bytes per image of the confidence PNG, of the
masks (RLE counts) and of a label row in Parquet with and without the column, and the
reconstruction error against the engine's float confidence (max and 99th percentile over
all pixels). Random weights give nearly flat probabilities; ``--contrast`` multiplies the
engine's logits before the softmax (same spatial structure, trained-like confidence). For
each contrast the last line names the cheapest encoding within the quantisation error.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "tests")]

from schemas import label_map_to_annotations, make_row, rows_to_table  # noqa: E402
from schemas.confidence import decode_confidence, encode_confidence  # noqa: E402


def photographs() -> dict[str, np.ndarray]:
    """Real photographs of several sizes (RGB uint8)."""
    from skimage import data

    return {"coffee": data.coffee(), "astronaut": data.astronaut(), "chelsea": data.chelsea(),
            "rocket": data.rocket(), "coffee_crop": np.ascontiguousarray(
                data.coffee()[50:350, 100:500])}


def engine_outputs(preset: str, contrast: float = 1.0
                   ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(name, labels, confidence, probs-derived confidence)`` per photograph.

    ``contrast`` > 1 multiplies the engine's logits before its softmax: random weights give
    nearly flat class probabilities, trained ones confident plateaus with dips at class
    boundaries; a larger contrast on the same (smoothly upsampled) logits stands in for that.
    """
    import torch
    from support.engine import build_random_backbones

    from cass_engine import CassConfig
    from cass_engine.segmenter import CassSegmenter

    clip, dino = build_random_backbones(0)
    config = CassConfig.from_preset(preset)
    if contrast != 1.0:
        import dataclasses

        config = dataclasses.replace(config, logit_scale=config.logit_scale * contrast)
    seg = CassSegmenter(clip, dino, config, torch.device("cpu"))
    seg.set_vocabulary()
    out = []
    for name, image in photographs().items():
        result = seg.segment([image], return_logits=False, return_probs=True)[0]
        labels = result.labels.numpy()
        from_probs = result.probs.gather(0, result.labels[None])[0].numpy()
        out.append((name, labels, result.confidence.numpy(), from_probs))
    return out


def parquet_bytes(rows: list[dict]) -> int:
    buffer = io.BytesIO()
    pq.write_table(rows_to_table(rows), buffer)
    return buffer.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="voc21")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--contrast", type=float, nargs="+", default=[1.0, 30.0],
                        help="logit multipliers to measure (1 = the engine as is)")
    args = parser.parse_args(argv)
    for contrast in args.contrast:
        print(f"== contrast x{contrast:g}")
        measure(engine_outputs(args.preset, contrast), args)
    return 0


def measure(outputs: list, args: argparse.Namespace) -> None:
    """Print the figures of every scale for one set of engine outputs."""
    num_classes = int(max(labels.max() for _, labels, _, _ in outputs)) + 1
    base_rows, masks = [], 0
    for name, labels, conf, from_probs in outputs:
        assert np.array_equal(conf, from_probs), "confidence != probs at the labels"
        anns = label_map_to_annotations(labels, np.ones(num_classes))
        masks += sum(len(a["segmentation"]["counts"]) for a in anns)
        base_rows.append(make_row(shard_id="s", source_uri="u", key=name,
                                  width=labels.shape[1], height=labels.shape[0],
                                  annotations=anns, presence=[0.5] * num_classes))
        print(f"{name}: {labels.shape[1]}x{labels.shape[0]}, {len(anns)} classes present, "
              f"confidence {conf.min():.3f}..{conf.max():.3f}")
    n = len(outputs)
    base = parquet_bytes(base_rows) / n
    print(f"preset={args.preset} images={n} masks_rle_bytes={masks / n:.0f} "
          f"row_parquet_bytes_without={base:.0f}")
    best = None
    for scale in args.scales:
        blobs = [encode_confidence(conf, scale) for _, _, conf, _ in outputs]
        errors = np.concatenate([
            np.abs(decode_confidence(b, *conf.shape) - conf).ravel()
            for b, (_, _, conf, _) in zip(blobs, outputs, strict=True)])
        with_col = parquet_bytes([{**r, "confidence": b}
                                  for r, b in zip(base_rows, blobs, strict=True)]) / n
        png = sum(map(len, blobs)) / n
        worst, p99 = float(errors.max()), float(np.percentile(errors, 99))
        print(f"scale=1/{scale} png_bytes={png:.0f} row_parquet_bytes_with={with_col:.0f} "
              f"(+{with_col - base:.0f}, {png / max(1, masks / n):.2f}x the masks) "
              f"max_err={worst:.4f} p99_err={p99:.4f}")
        if worst <= 0.5 / 255 + 1e-6 and (best is None or png < best[1]):
            best = (scale, png)
    if best is not None:
        print(f"chosen: scale=1/{best[0]} ({best[1]:.0f} bytes/image, within quantisation)")


if __name__ == "__main__":
    pa.set_cpu_count(1)
    sys.exit(main())
