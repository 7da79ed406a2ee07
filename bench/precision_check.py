"""Mixed precision check: autocast outputs against float32 on the same device and image.

    python bench/precision_check.py --device cuda [--preset coco_stuff] [--random-weights 0]

Prints, per dtype, the max absolute class-probability difference and the share of pixels
whose label agrees with the float32 run.
"""

from __future__ import annotations

import argparse

import torch
from engine_bench import photo_336x448

from cass_engine import CassConfig, build_segmenter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="coco_stuff")
    p.add_argument("--random-weights", type=int, default=0)
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--dino-weights", default=None)
    args = p.parse_args()
    image = photo_336x448()
    outputs = {}
    for name in ("float32", "float16", "bfloat16"):
        seg = build_segmenter(CassConfig.from_preset(args.preset), device=args.device,
                              dtype=getattr(torch, name),
                              random_weights=None if args.clip_weights else args.random_weights,
                              clip_weights=args.clip_weights, dino_weights=args.dino_weights)
        seg.set_vocabulary()
        outputs[name] = seg.segment([image], return_logits=False)[0]
    base = outputs["float32"]
    for name in ("float16", "bfloat16"):
        out = outputs[name]
        diff = (out.probs - base.probs).abs().max().item()
        agree = (out.labels == base.labels).float().mean().item()
        print(f"{args.preset} {name}: max |probs - fp32| = {diff:.2e}, "
              f"label agreement {agree:.4%}")


if __name__ == "__main__":
    main()
