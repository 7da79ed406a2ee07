"""Engine configuration: the CASS hyperparameters as a frozen dataclass, and the presets.

Every behaviour that differs between benchmark configurations is a field here (eigenscaling on
or off, where the object-presence prior comes from, sliding window or whole image), so the
model code never tests a dataset name. Defaults reproduce the official implementation; the
cleaner variants are named options:

- ``head_pairing``: ``"reference"`` fuses CLIP head i with DINO head col[i] and the weight of
  the pair (row[i], col[i]) as the official code does; ``"matched"`` fuses the pairs that the
  Hungarian assignment actually matched.
- ``rank``: ``"reference"`` keeps 10 eigenpairs of the DINO graph; ``"energy"`` keeps the
  smallest number reaching ``energy_threshold`` of the eigenvalue sum (the paper's intent).
- ``dino_input``: ``"reference"`` rebuilds the DINO image the official way (ImageNet
  un-normalisation with its 0.255 blue typo, uint8 truncation, Pillow-bicubic square resize);
  ``"exact"`` feeds DINO the true pixels of the same region, ImageNet-normalised.
- ``dino_key_fp16``: the official code rounds DINO keys to float16 before building its graph;
  ``True`` reproduces that rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .vocabulary import Vocabulary, bundled_vocabulary, load_vocabulary

HeadPairing = Literal["reference", "matched"]
RankMode = Literal["reference", "energy"]
DinoInput = Literal["reference", "exact"]
PriorSource = Literal["image", "crop"]


@dataclass(frozen=True)
class CassConfig:
    """CASS hyperparameters (see ``cass-spec`` sections 1-9).

    Attributes:
        preset: name of the preset the values came from (informational).
        vocabulary_file: bundled vocabulary file of the preset, used when no user file is given.
        vocabulary_path: a user vocabulary file; overrides ``vocabulary_file`` when set.
        short_side: images are resized so their short side is this many pixels.
        max_long_side: cap on the long side after resizing.
        slide_crop: sliding-window crop size in pixels; ``None`` runs one pass over the whole
            resized image.
        slide_stride: sliding-window stride in pixels.
        gamma: weight of the object-presence prior in the logits (0..1).
        alpha: weight of the patch mean vector in the adjusted text embedding (0..1).
        h_threshold: Ward-linkage distance at which text queries are cut into groups.
        prob_thd: pixels whose best class probability is below this get class 0.
        eigenscaling: apply the dynamic eigenscaling to the kept DINO eigenvalues.
        prior_source: ``"image"``: CLS of the whole resized image (once per image);
            ``"crop"``: CLS of each crop.
        sigma: standard deviation, in patches, of the Gaussian neighbourhood prior.
        k_eigen: number of leading eigenvalues compared between heads.
        fusion_scale: the factor 10 in (10 w A_dino + A_clip) / (10 w + 1).
        rank: see module docstring; ``reference_rank`` is the kept rank in reference mode.
        energy_threshold: eigenvalue energy kept in ``rank="energy"`` mode.
        eig_scale_high, eig_scale_low: the 1.5 and 0.5 of the eigenscaling function.
        top_n: patches averaged into the mean vector of the adjusted text embedding.
        logit_scale: logits are multiplied by this before the softmax over queries.
        head_pairing, dino_input, dino_key_fp16: see module docstring.
        pamr_steps: PAMR refinement iterations (0 = off, as for the published numbers).
        pamr_dilations: PAMR dilations.
    """

    preset: str = "custom"
    vocabulary_file: str | None = "coco_stuff.txt"
    vocabulary_path: str | None = None
    short_side: int = 336
    max_long_side: int = 2048
    slide_crop: int | None = 224
    slide_stride: int = 112
    gamma: float = 0.20
    alpha: float = 0.02
    h_threshold: float = 0.02
    prob_thd: float = 0.0
    eigenscaling: bool = True
    prior_source: PriorSource = "image"
    sigma: float = 5.0
    k_eigen: int = 20
    fusion_scale: float = 10.0
    rank: RankMode = "reference"
    reference_rank: int = 10
    energy_threshold: float = 0.95
    eig_scale_high: float = 1.5
    eig_scale_low: float = 0.5
    top_n: int = 2
    logit_scale: float = 40.0
    head_pairing: HeadPairing = "reference"
    dino_input: DinoInput = "reference"
    dino_key_fp16: bool = True
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = field(default=(8, 16))

    def __post_init__(self) -> None:
        _check(self.short_side >= 16, "short_side must be at least 16 pixels")
        _check(self.max_long_side >= self.short_side, "max_long_side must be >= short_side")
        if self.slide_crop is not None:
            _check(self.slide_crop >= 16 and self.slide_crop % 16 == 0,
                   "slide_crop must be a positive multiple of 16 (CLIP patch size)")
            _check(0 < self.slide_stride <= self.slide_crop, "slide_stride must be in (0, crop]")
        for name in ("gamma", "alpha"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        _check(self.h_threshold >= 0.0, "h_threshold must be >= 0")
        _check(0.0 <= self.prob_thd <= 1.0, "prob_thd must be in [0, 1]")
        _check(self.prior_source in ("image", "crop"), "prior_source must be 'image' or 'crop'")
        _check(self.head_pairing in ("reference", "matched"),
               "head_pairing must be 'reference' or 'matched'")
        _check(self.rank in ("reference", "energy"), "rank must be 'reference' or 'energy'")
        _check(self.dino_input in ("reference", "exact"),
               "dino_input must be 'reference' or 'exact'")
        _check(1 <= self.reference_rank <= 64, "reference_rank must be in 1..64")
        _check(0.0 < self.energy_threshold <= 1.0, "energy_threshold must be in (0, 1]")
        _check(1 <= self.k_eigen <= 64, "k_eigen must be in 1..64 (the graphs have rank <= 64)")
        _check(self.sigma > 0, "sigma must be > 0")
        _check(self.top_n >= 1, "top_n must be >= 1")
        _check(self.pamr_steps >= 0, "pamr_steps must be >= 0")
        _check(self.vocabulary_file is not None or self.vocabulary_path is not None,
               "a vocabulary is needed: vocabulary_file or vocabulary_path")

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> CassConfig:
        """The configuration of a named preset, with optional field overrides.

        Raises:
            ValueError: unknown preset or field name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown CassConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides: object) -> CassConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)

    def load_vocabulary(self) -> Vocabulary:
        """The user vocabulary file if set, else the preset's bundled file."""
        if self.vocabulary_path is not None:
            return load_vocabulary(self.vocabulary_path)
        assert self.vocabulary_file is not None
        return bundled_vocabulary(self.vocabulary_file)

    def to_dict(self) -> dict:
        """Plain-JSON view, for run records."""
        data = dataclasses.asdict(self)
        data["pamr_dilations"] = list(self.pamr_dilations)
        return data


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid CassConfig: {message}")


def _preset(name: str, vocabulary_file: str, **values: object) -> CassConfig:
    return CassConfig(preset=name, vocabulary_file=vocabulary_file, **values)


#: The official configurations (cass-spec section 9).
PRESETS: dict[str, CassConfig] = {
    "voc21": _preset("voc21", "voc21.txt", slide_crop=None, gamma=0.10, alpha=0.03,
                     h_threshold=0.10, prob_thd=0.1),
    "context60": _preset("context60", "context60.txt", gamma=0.25, alpha=0.04,
                         h_threshold=0.09, prob_thd=0.1),
    "coco_object": _preset("coco_object", "coco_object.txt", gamma=0.25, alpha=0.01,
                           h_threshold=0.10, prob_thd=0.1),
    "voc20": _preset("voc20", "voc20.txt", gamma=0.40, alpha=0.02, h_threshold=0.10,
                     prob_thd=0.0, eigenscaling=False),
    "context59": _preset("context59", "context59.txt", gamma=0.25, alpha=0.04,
                         h_threshold=0.09, prob_thd=0.0),
    "coco_stuff": _preset("coco_stuff", "coco_stuff.txt", gamma=0.20, alpha=0.02,
                          h_threshold=0.02, prob_thd=0.0),
    "cityscapes": _preset("cityscapes", "city_scapes.txt", short_side=560, gamma=0.10,
                          alpha=0.03, h_threshold=0.14, prob_thd=0.0, eigenscaling=False,
                          prior_source="crop"),
    "ade20k": _preset("ade20k", "ade20k.txt", gamma=0.30, alpha=0.05, h_threshold=0.06,
                      prob_thd=0.0),
}

#: Preset whose numbers apply to a user's own vocabulary when no preset is named.
DEFAULT_PRESET = "coco_stuff"
