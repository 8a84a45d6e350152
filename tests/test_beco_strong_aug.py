"""BECO strong augmentation with albumentations 1.3 semantics, independent of the installed albumentations:
the parameter draws (order, probabilities, ranges, blur kernel rule), each op against its formula, and
the batch wrapper's layout (contiguous output: a channels-last batch crashes DeepLabV2's CPU backward)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from segmentation.beco.model import (AugParams, StrongAug, brightness_contrast_uint8, gaussian_blur_uint8,
                                     shift_hsv_uint8, strong_augment, to_gray_uint8)

# Drawn by albumentations 1.3.1 itself (ReplayCompose of the reference pipeline, random.seed(s)),
# rounded to 6 digits: the draw order and rules must reproduce these exactly.
GOLDEN_1_3_1 = {
    0: dict(color=True, alpha=0.903567, beta=0.00451, hue=11.351944, sat=-11.801236, val=-0.936122, gray=False, ksize=0),
    1: dict(color=False, gray=False, ksize=5),
    2: dict(color=False, gray=True, ksize=3),
    3: dict(color=True, alpha=1.041568, beta=0.050288, hue=-19.47328, sat=20.248145, val=-9.625839, gray=False, ksize=0),
    4: dict(color=True, alpha=0.861989, beta=-0.173394, hue=16.718202, sat=18.027141, val=10.606504, gray=False, ksize=0),
    5: dict(color=True, alpha=1.17698, beta=0.095959, hue=-18.839791, sat=-2.062641, val=17.734269, gray=False, ksize=0),
}


def _img(seed: int = 0, h: int = 23, w: int = 31) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:4] = img[:4, :, :1]  # grey rows (saturation 0)
    return img


def test_draws_equal_albumentations_1_3_1():
    aug = StrongAug()
    for seed, want in GOLDEN_1_3_1.items():
        aug.set_random_seed(seed)
        p = aug.draw()
        got = {k: (round(getattr(p, k), 6) if isinstance(getattr(p, k), float) else getattr(p, k)) for k in want}
        assert got == want, seed
        if not want["color"]:
            assert (p.alpha, p.beta, p.hue, p.sat, p.val) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_parameter_distribution_is_the_1x_one():
    aug = StrongAug(1234)
    ps = [aug.draw() for _ in range(20000)]
    n = len(ps)
    frac = lambda xs: sum(xs) / n  # noqa: E731
    assert abs(frac(p.color for p in ps) - 0.8) < 0.015
    assert abs(frac(p.gray for p in ps) - 0.2) < 0.015
    assert abs(frac(p.ksize > 0 for p in ps) - 0.5) < 0.015
    ks = [p.ksize for p in ps if p.ksize]
    assert set(ks) == {3, 5}
    # 1.3: randrange(3, 6) with 4 moved to 5, so k = 3 one time in three (not 2.x's sigma in [0.5, 3])
    assert abs(ks.count(3) / len(ks) - 1 / 3) < 0.02
    col = [p for p in ps if p.color]
    for name, lim in (("beta", 0.2), ("hue", 20.0), ("sat", 30.0), ("val", 20.0)):
        v = np.array([getattr(p, name) for p in col])
        assert v.min() >= -lim and v.max() <= lim and v.min() < -0.95 * lim and v.max() > 0.95 * lim, name
        assert abs(v.mean()) < 0.03 * lim and abs(v.std() - lim / np.sqrt(3)) < 0.03 * lim, name  # uniform
    a = np.array([p.alpha for p in col])
    assert a.min() >= 0.8 and a.max() <= 1.2 and abs(a.mean() - 1.0) < 0.006
    # reseeding restarts the stream (per-epoch reseed: a resumed run repeats its epochs)
    aug.set_random_seed(7)
    first = [aug.draw() for _ in range(5)]
    aug.set_random_seed(7)
    assert [aug.draw() for _ in range(5)] == first


def test_brightness_contrast_formula():
    img = _img()
    for alpha, beta in ((1.13, -0.07), (0.82, 0.19), (1.0, 0.05), (1.2, 0.0)):
        ref = np.clip(img.astype(np.float32) * np.float32(alpha) + np.float32(beta * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(brightness_contrast_uint8(img, alpha, beta), ref)


def test_hsv_shift_formula_including_grey_pixels():
    img = _img(1)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float64)
    for hue, sat, val in ((11.35, -11.8, -0.93), (-19.47, 20.25, 17.7), (5.5, 0.0, 0.0)):
        h = np.mod(hsv[..., 0] + hue, 180).astype(np.uint8)
        s = np.clip(hsv[..., 1] + sat, 0, 255).astype(np.uint8)
        v = np.clip(hsv[..., 2] + val, 0, 255).astype(np.uint8)
        ref = cv2.cvtColor(np.dstack([h, s, v]), cv2.COLOR_HSV2RGB)
        assert np.array_equal(shift_hsv_uint8(img, hue, sat, val), ref)
    # 1.x shifts the saturation of grey pixels too (2.x keeps S = 0 pixels grey)
    out = shift_hsv_uint8(img, 0.0, 25.0, 0.0)
    assert (out[:4].max(-1).astype(int) - out[:4].min(-1)).max() > 0
    assert shift_hsv_uint8(img, 0.0, 0.0, 0.0) is img


def test_to_gray_and_blur_formulas():
    img = _img(2)
    g = to_gray_uint8(img)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
    f = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(g[..., 0].astype(np.float64) - f).max() <= 0.5 + 1e-6
    # sigma 0: OpenCV's fixed binomial kernels for k = 3 and 5 (the "sigma from k" regime), reflect-101
    for k, taps in ((3, [1, 2, 1]), (5, [1, 4, 6, 4, 1])):
        ker = np.array(taps, np.float64) / sum(taps)
        ref = cv2.sepFilter2D(img.astype(np.float64), -1, ker, ker, borderType=cv2.BORDER_REFLECT_101)
        assert np.array_equal(gaussian_blur_uint8(img, k), np.floor(ref + 0.5).astype(np.uint8)), k


def test_apply_order_and_no_op():
    img = _img(3)
    p = AugParams(color=True, alpha=1.1, beta=-0.05, hue=7.0, sat=-9.0, val=4.0, gray=True, ksize=5)
    want = brightness_contrast_uint8(img, 1.1, -0.05)
    want = gaussian_blur_uint8(to_gray_uint8(shift_hsv_uint8(want, 7.0, -9.0, 4.0)), 5)
    assert np.array_equal(StrongAug.apply(img, p), want)
    assert np.array_equal(StrongAug.apply(img, AugParams()), img)


def test_strong_augment_batch_is_contiguous_and_swaps_channels_back():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    u8 = torch.randint(0, 256, (2, 3, 16, 20), generator=torch.Generator().manual_seed(0))
    x = (u8 / 255.0 - mean) / std  # a normalised batch of real (uint8) images
    calls = []

    class Identity(StrongAug):
        def __call__(self, img):
            calls.append(img.copy())
            return img

    y = strong_augment(x, Identity())
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    # identity augmentation: only the uint8 truncation remains (< 1/255 before normalisation)
    assert float(((x - y) * std).abs().max()) <= 1 / 255 + 1e-6
    # the reference hands albumentations a B-G-R image (cv2 BGR2RGB applied to RGB)
    rgb0 = u8[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.abs(calls[0].astype(int) - rgb0[..., ::-1].astype(int)).max() <= 1
    real = strong_augment(x, StrongAug(0))
    assert real.is_contiguous() and real.shape == x.shape


def test_albumentations_not_needed(monkeypatch):
    import sys

    from segmentation.beco.model import build_strong_aug

    monkeypatch.setitem(sys.modules, "albumentations", None)  # any import of it now fails
    out = strong_augment(torch.zeros(1, 3, 8, 8), build_strong_aug(3))
    assert torch.isfinite(out).all()
