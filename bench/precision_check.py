"""Reduced precision against float32: label agreement and probability differences.

    python bench/precision_check.py --device cpu                  # bf16 vs fp32, all presets
    python bench/precision_check.py --device cuda [--preset coco_stuff] [--dtype float16]
        [--random-weights 0 | --clip-weights F --dino-weights F] [--photos coffee,astronaut]

For each preset (default: all 8) the engine runs on real photographs (scikit-image) in
float32 and in each reduced dtype (default: bfloat16 on CPU; float16 and bfloat16 on CUDA),
every one of them in its own full mode (on CPU the bf16 mode also encodes the text in bf16).
Prints one line per preset and dtype: ``<preset> <dtype>: label agreement A %, max |dprob| M,
mean |dprob| m, presence max diff P`` over all pixels of all photos. The backbones are built
once per dtype and shared by the presets. Random weights are the test suite's
(``tests/support/engine.py``: seeded, with per-head key decays, because freshly initialised
heads have tied spectra and their Hungarian matching is decided by rounding noise).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from engine_bench import photo_336x448
from skimage import data

from cass_engine import CassConfig
from cass_engine.config import PRESETS
from cass_engine.segmenter import CassSegmenter, resolve_dtype
from cass_engine.weights import load_clip, load_dino


def photographs(names: list[str]) -> list[np.ndarray]:
    """RGB uint8 photographs from scikit-image (``coffee`` is the 336x448 bench crop)."""
    out = []
    for name in names:
        image = photo_336x448() if name == "coffee" else getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(image[..., :3]))
    return out


def backbones(args: argparse.Namespace):
    """The two backbones; random ones get the test suite's per-head key decays."""
    if args.clip_weights:
        return (load_clip(args.clip_weights)[0], load_dino(args.dino_weights)[0])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.engine import build_random_backbones

    return build_random_backbones(args.random_weights)


def run_preset(models: dict, preset: str, device: torch.device, images: list) -> dict:
    """Results per dtype for one preset: ``{dtype: [SegmentationResult per image]}``."""
    out = {}
    for name, (clip, dino) in models.items():
        dtype = resolve_dtype(device, name)
        seg = CassSegmenter(clip, dino, CassConfig.from_preset(preset), device,
                            amp_dtype=None if dtype == torch.float32 else dtype)
        seg.set_vocabulary()
        out[name] = [seg.segment([image], return_logits=False)[0] for image in images]
    return out


def compare(base: list, other: list) -> str:
    agree = sum((o.labels == b.labels).sum().item() for o, b in zip(other, base, strict=True))
    pixels = sum(b.labels.numel() for b in base)
    diffs = [(o.probs - b.probs).abs() for o, b in zip(other, base, strict=True)]
    presence = max((o.presence - b.presence).abs().max().item()
                   for o, b in zip(other, base, strict=True))
    mean = sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)
    return (f"label agreement {100 * agree / pixels:.3f} %, max |dprob| "
            f"{max(d.max().item() for d in diffs):.3e}, mean |dprob| {mean:.2e}, "
            f"presence max diff {presence:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), default=None,
                   help="preset(s) to check (default: all 8)")
    p.add_argument("--all-presets", action="store_true", help="all 8 presets (the default)")
    p.add_argument("--dtype", action="append", choices=["float16", "bfloat16"], default=None,
                   help="reduced dtype(s) (default: bfloat16 on CPU, both on CUDA)")
    p.add_argument("--photos", default="coffee,astronaut,chelsea",
                   help="scikit-image photographs, comma-separated")
    p.add_argument("--random-weights", type=int, default=0)
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--dino-weights", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtypes = args.dtype or (["bfloat16"] if device.type == "cpu" else ["float16", "bfloat16"])
    presets = list(PRESETS) if args.all_presets or not args.preset else args.preset
    images = photographs(args.photos.split(","))
    clip, dino = backbones(args)
    models = {"float32": (clip.to(device), dino.to(device))}
    for name in dtypes:  # CassSegmenter casts CPU backbones in place: one copy per dtype
        models[name] = (copy.deepcopy(clip), copy.deepcopy(dino))
    weights = "files" if args.clip_weights else f"random seed {args.random_weights}"
    print(f"device={device} photos={args.photos} weights={weights}")
    for preset in presets:
        results = run_preset(models, preset, device, images)
        for name in dtypes:
            print(f"{preset} {name}: {compare(results['float32'], results[name])}", flush=True)


if __name__ == "__main__":
    main()
