"""Input preparation against direct formulations of the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cass_engine.preprocess import (
    apply_lut,
    crop_boxes,
    dino_input,
    interpolate_pos_embed,
    reference_dino_lut,
    resized_hw,
    square_resize_bicubic,
)


@pytest.mark.parametrize("hw, expected", [((300, 400), (336, 448)), ((480, 640), (336, 448)),
                                          ((1024, 2048), (560, 1120)), ((100, 5000), (41, 2048))])
def test_resized_hw_follows_keep_ratio_rule(hw, expected):
    short = 560 if hw == (1024, 2048) else 336
    assert resized_hw(*hw, short, 2048) == expected


def test_crop_grid_336x448_has_six_crops_covering_every_pixel():
    boxes = crop_boxes(336, 448, 224, 112)
    assert len(boxes) == 6
    cover = torch.zeros(336, 448)
    for y1, x1, y2, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (224, 224)
        cover[y1:y2, x1:x2] += 1
    assert bool((cover > 0).all())


def test_crop_grid_shifts_overrunning_window_back_inside():
    boxes = crop_boxes(336, 505, 224, 112)
    # n = (505 - 224 + 111) // 112 + 1 = 4 columns; the last one would end at 560 > 505.
    assert sorted({b[1] for b in boxes}) == [0, 112, 224, 281]
    assert max(b[3] for b in boxes) == 505


def test_crop_grid_small_image_and_whole_image_mode():
    assert crop_boxes(100, 150, 224, 112) == [(0, 0, 100, 150)]
    assert crop_boxes(336, 448, None, 112) == [(0, 0, 336, 448)]


def test_reference_lut_matches_spec_coefficients():
    lut = reference_dino_lut().long()
    p = torch.arange(256, dtype=torch.float64)
    approx = [torch.floor(0.85247 * p + 19.016), torch.floor(0.85725 * p + 16.200),
              torch.floor(0.92466 * p + 7.278)]
    for c in range(3):
        assert (lut[c] - approx[c]).abs().max() <= 1  # rounded coefficients, exact table
    assert lut[0, 0] == 19 and lut[2, 255] == 243


def test_reference_lut_equals_pixelwise_float32_pipeline():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None, :, :, None]  # [1,3,256,1]
    mean = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    norm = (pixels[0].float() - mean) / std
    restored = norm * torch.tensor([0.229, 0.224, 0.255]).view(3, 1, 1) + torch.tensor(
        [0.485, 0.456, 0.406]).view(3, 1, 1)
    direct = (restored.numpy() * 255).astype(np.uint8)
    mapped = apply_lut(pixels, reference_dino_lut())[0].numpy()
    assert np.abs(mapped.astype(int) - direct.astype(int)).max() <= 1
    assert (mapped == direct).mean() > 0.99


@pytest.mark.parametrize("hw", [(336, 448), (401, 336), (50, 97)])
def test_square_resize_is_bit_exact_with_pillow(hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    side = min(hw)
    expected = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
    got = square_resize_bicubic(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_dino_input_modes_and_multiple_of_eight():
    crop = torch.randint(0, 256, (2, 3, 100, 130), dtype=torch.uint8)
    ref = dino_input(crop, "reference", reference_dino_lut())
    exact = dino_input(crop, "exact", None)
    assert ref.shape == (2, 3, 96, 96)
    assert exact.shape == (2, 3, 96, 128)
    assert not torch.allclose(ref, exact[..., :96])


def test_pos_embed_native_grid_unchanged_and_interpolation_rule():
    pos = torch.randn(1 + 14 * 14, 8)
    assert interpolate_pos_embed(pos, (224, 224), 16) is pos
    out = interpolate_pos_embed(pos, (336, 448), 16)
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, scale_factor=(21.1 / 14, 28.1 / 14), mode="bicubic",
                           align_corners=False, recompute_scale_factor=False)
    assert out.shape == (1 + 21 * 28, 8)
    assert torch.equal(out[0], pos[0])
    assert torch.allclose(out[1:], direct.permute(0, 2, 3, 1).reshape(-1, 8))
    # a non-square image with the native patch count is still resampled (reference rule)
    assert not torch.equal(interpolate_pos_embed(pos, (224, 239), 16), pos)
