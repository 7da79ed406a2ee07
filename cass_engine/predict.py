"""Single-image command line: segment one image and save the arrays (and an overlay).

    python -m cass_engine.predict --image photo.jpg --out result.npz \\
        [--preset coco_stuff (the default)] [--vocab my_classes.txt]
        [--clip-weights ViT-B-16.pt --dino-weights dino.pth | --random-weights SEED]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16|auto]
        [--short-side N] [--overlay overlay.png] [--save-probs] [--save-logits]

Writes a compressed .npz with ``labels`` [H, W] int32, ``presence`` [C], ``prior`` [C],
``pixel_fraction`` [C] and ``mask_scores`` [C] float32, ``class_names`` and ``query_words``
(str arrays) and ``weights`` (JSON of the weight sources and dtype; says ``random`` when
random weights were used). Only on request, since they grow with image size x classes (a
12-megapixel photo with 171 classes is ~8 GB of float32 each): ``--save-probs`` adds
``probs`` [C, H, W] float32, ``--save-logits`` adds ``logits`` [Q, H, W] float32 (before
the logit scale, at the input size). Without them the full maps are never built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import DEFAULT_PRESET, PRESETS, CassConfig
from .images import ImageInputError, load_image
from .vocabulary import VocabularyError


def build_parser() -> argparse.ArgumentParser:
    """The command line; every optional flag's help states its default."""
    p = argparse.ArgumentParser(prog="python -m cass_engine.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="hyperparameters (and vocabulary unless --vocab), as the labeling "
                        f"job's --preset (default: {DEFAULT_PRESET})")
    p.add_argument("--vocab", default=None,
                   help="vocabulary file: one class per line, synonyms separated by ', ' "
                        "(default: the preset's bundled vocabulary)")
    p.add_argument("--clip-weights", default=None,
                   help="CLIP ViT-B/16 weights (OpenAI .pt, open_clip or state dict; path or "
                        "URL; default: official weights from the hub)")
    p.add_argument("--dino-weights", default=None,
                   help="DINO ViT-B/8 weights (dino_vitbase8_pretrain.pth or timm; path or "
                        "URL; default: official weights from the hub)")
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="seeded random weights (smoke tests only; recorded in the output; "
                        "default: off)")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="backbone precision (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--short-side", type=int, default=None,
                   help="override the resize target (default: the preset's)")
    p.add_argument("--save-probs", action="store_true",
                   help="also store the [C, H, W] class probabilities (large; default: off)")
    p.add_argument("--save-logits", action="store_true",
                   help="also store the [Q, H, W] query logits (large; default: off)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--overlay", default=None,
                   help="also save a PNG with the label map (default: none)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> CassConfig:
    """The named preset (default :data:`DEFAULT_PRESET`, as the labeling job) with the user's
    vocabulary file and overrides. Reads no file."""
    overrides: dict = {}
    if args.vocab is not None:
        overrides["vocabulary_path"] = args.vocab
    if args.short_side is not None:
        overrides["short_side"] = args.short_side
    return CassConfig.from_preset(args.preset or DEFAULT_PRESET, **overrides)


def run(args: argparse.Namespace) -> Path:
    """Segment ``args.image`` and write the outputs; returns the .npz path."""
    import torch

    from .segmenter import build_segmenter

    image = load_image(args.image)
    config = build_config(args)
    vocabulary = config.load_vocabulary()  # parsed once; fails before the weights load
    t0 = time.perf_counter()
    seg = build_segmenter(config, clip_weights=args.clip_weights, dino_weights=args.dino_weights,
                          random_weights=args.random_weights, device=torch.device(args.device),
                          dtype=args.dtype)
    vocab = seg.set_vocabulary(vocabulary)
    t1 = time.perf_counter()
    result = seg.segment([image], return_logits=args.save_logits,
                         return_probs=args.save_probs)[0]
    t2 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "labels": result.labels.numpy().astype(np.int32), "presence": result.presence.numpy(),
        "prior": result.prior.numpy(), "pixel_fraction": result.pixel_fraction.numpy(),
        "mask_scores": result.mask_scores.numpy(),
        "class_names": np.array(vocab.vocabulary.class_names),
        "query_words": np.array(vocab.vocabulary.query_words),
        "weights": np.array(json.dumps(seg.weights_info))}
    if args.save_probs:
        arrays["probs"] = result.probs.numpy()
    if args.save_logits:
        arrays["logits"] = result.logits.numpy()
    np.savez_compressed(out, **arrays)
    if args.overlay:
        from .overlay import save_overlay
        save_overlay(image, result.labels.numpy(), vocab.vocabulary.class_names, args.overlay)
    _print_summary(result, vocab.vocabulary.class_names, seg.weights_info, t1 - t0, t2 - t1, out)
    return out


def _print_summary(result, names, weights_info, load_s, seg_s, out) -> None:
    fractions = result.pixel_fraction.numpy()
    top = np.argsort(-fractions)[:5]
    listing = ", ".join(f"{names[i]} {fractions[i]:.0%}" for i in top if fractions[i] > 0)
    shape = tuple(result.labels.shape)
    print(f"segmented {shape} in {seg_s:.1f}s (setup {load_s:.1f}s): {listing}")
    if weights_info.get("random_weights") is not None:
        print(f"note: random weights (seed {weights_info['random_weights']}): outputs are "
              "meaningless, for smoke tests only")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ImageInputError, VocabularyError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # weights problems (WeightsError) and engine failures
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
