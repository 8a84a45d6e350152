"""The BECO co-training model, as the reference trains and tests it: two DeepLabV2 networks, class-mix with the
warm-up rule, online labels/masks, boundary weighting, confident-pixel CE + cross pseudo supervision,
strong colour augmentation, and the two-net (multi-scale) test path.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.errors import DataError
from tools.imutils import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BECOSettings", "BECO", "unwrap", "StrongAug", "AugParams", "build_strong_aug", "strong_augment",
           "boundary_map", "class_mix_batch", "beco_losses", "check_batch"]

IGNORE = 255


@dataclass
class BECOSettings:
    """``model.settings`` of the run (the values the reference's main.py hard-codes). Boundary weights
    of the four loss terms: ``bdry_whb`` network1's confident CE, ``bdry_whi`` network2's confident CE,
    ``bdry_wlb`` network1's cross-supervision, ``bdry_wli`` network2's cross-supervision (each term is
    weighted by ``1 + w * boundary``)."""

    ignore_bg: bool = True
    mix_aug: bool = True
    mix_prob: float = 0.5
    bdry_size: int = 1
    bdry_whb: float = 0.2
    bdry_whi: float = 0.2
    bdry_wlb: float = 0.0
    bdry_wli: float = 0.0
    warm_up: int = 2
    highres_t: float = 0.95
    save_logits: bool = True
    test_msc: bool = True
    msc_scales: Sequence[float] = field(default_factory=lambda: (0.75, 1.0, 1.25))

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> "BECOSettings":
        return cls(**{f.name: m[f.name] for f in fields(cls) if f.name in m})


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP/DataParallel wrapper (checkpoints carry no ``module.`` prefix)."""
    return net.module if hasattr(net, "module") else net


# The reference's strong augmentation, written for albumentations 1.x:
#   Compose([Compose([RandomBrightnessContrast(p=1), HueSaturationValue(p=1)], p=0.8),
#            ToGray(p=0.2), GaussianBlur(5, p=0.5)])
# with library defaults. albumentations 2.x changed several of these ops (GaussianBlur(5) draws
# sigma in [0.5, 3]; saturation shifts skip grey pixels; ToGray and brightness/contrast round
# differently), so the 1.3 behaviour is written out here with OpenCV/numpy; docs/deviations.md
# lists the facts it follows.
COLOR_P, GRAY_P, BLUR_P = 0.8, 0.2, 0.5
BRIGHTNESS_LIMIT = CONTRAST_LIMIT = 0.2       # RandomBrightnessContrast defaults (brightness_by_max)
HUE_LIMIT, SAT_LIMIT, VAL_LIMIT = 20.0, 30.0, 20.0  # HueSaturationValue defaults (uint8 units)
BLUR_LIMIT = (3, 5)                           # GaussianBlur(5): (0, 5) raised to (3, 5), sigma 0


@dataclass
class AugParams:
    """One draw of the strong augmentation. ``color``: brightness/contrast + HSV applied, with
    contrast factor ``alpha``, brightness offset ``beta`` (fraction of 255) and HSV shifts; ``gray``:
    ToGray applied; ``ksize``: Gaussian kernel size (0 = no blur; sigma follows from it)."""

    color: bool = False
    alpha: float = 1.0
    beta: float = 0.0
    hue: float = 0.0
    sat: float = 0.0
    val: float = 0.0
    gray: bool = False
    ksize: int = 0


def brightness_contrast_uint8(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """albumentations 1.x ``brightness_contrast_adjust`` on uint8 (brightness_by_max): a float32 LUT
    ``i * alpha + beta * 255``, clipped to [0, 255] and truncated to uint8. img: (H,W,C) uint8."""
    lut = np.arange(256, dtype=np.float32)
    if alpha != 1:
        lut *= np.float32(alpha)
    if beta != 0:
        lut += np.float32(beta * 255)
    return cv2.LUT(img, np.clip(lut, 0, 255).astype(np.uint8))


def shift_hsv_uint8(img: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """albumentations 1.x ``shift_hsv`` on a 3-channel uint8 image: OpenCV HSV (hue in [0, 180)),
    hue LUT ``(h + hue) mod 180``, saturation/value LUTs ``clip(x + shift, 0, 255)``, each truncated
    to uint8 (every pixel, grey ones included), back to RGB."""
    if hue == 0 and sat == 0 and val == 0:
        return img
    h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    base = np.arange(256, dtype=np.float64)
    if hue != 0:
        h = cv2.LUT(h, np.mod(base + hue, 180).astype(np.uint8))
    if sat != 0:
        s = cv2.LUT(s, np.clip(base + sat, 0, 255).astype(np.uint8))
    if val != 0:
        v = cv2.LUT(v, np.clip(base + val, 0, 255).astype(np.uint8))
    return cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2RGB)


def to_gray_uint8(img: np.ndarray) -> np.ndarray:
    """albumentations 1.x ``ToGray``: OpenCV RGB2GRAY (0.299 R + 0.587 G + 0.114 B), then the grey
    channel copied to 3 channels."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_blur_uint8(img: np.ndarray, ksize: int) -> np.ndarray:
    """albumentations 1.x ``gaussian_blur`` with sigma 0: ``cv2.GaussianBlur((k, k), 0)``, so OpenCV
    derives sigma from k (for k = 3 and 5 it uses its fixed binomial kernels [1,2,1]/4 and
    [1,4,6,4,1]/16); border reflect-101."""
    return cv2.GaussianBlur(img, (ksize, ksize), 0)


class StrongAug:
    """The reference's strong augmentation with albumentations 1.3 semantics, drawing its parameters
    in the very order albumentations 1.3 draws them from Python's ``random`` (a coin per Compose and
    per transform, then each transform's ``get_params``), here from an own ``random.Random`` so that
    it can be reseeded per epoch. Call it on an (H,W,3) uint8 image; returns a new uint8 image."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng.seed(int(seed))

    def draw(self) -> AugParams:
        r = self.rng
        p = AugParams()
        r.random()                          # the outer Compose's coin (p=1: always runs)
        if r.random() < COLOR_P:            # inner Compose
            p.color = True
            r.random()                      # RandomBrightnessContrast coin (p=1)
            p.alpha = 1.0 + r.uniform(-CONTRAST_LIMIT, CONTRAST_LIMIT)
            p.beta = 0.0 + r.uniform(-BRIGHTNESS_LIMIT, BRIGHTNESS_LIMIT)
            r.random()                      # HueSaturationValue coin (p=1)
            p.hue = r.uniform(-HUE_LIMIT, HUE_LIMIT)
            p.sat = r.uniform(-SAT_LIMIT, SAT_LIMIT)
            p.val = r.uniform(-VAL_LIMIT, VAL_LIMIT)
        p.gray = r.random() < GRAY_P
        if r.random() < BLUR_P:
            # 1.3's rule: randrange over [3, 5], an even draw moves to (k + 1) mod (5 + 1), so
            # k = 3 with probability 1/3 and k = 5 with 2/3; sigma is drawn from (0, 0).
            k = r.randrange(BLUR_LIMIT[0], BLUR_LIMIT[1] + 1)
            if k % 2 != 1:
                k = (k + 1) % (BLUR_LIMIT[1] + 1)
            r.uniform(0.0, 0.0)
            p.ksize = k
        return p

    @staticmethod
    def apply(img: np.ndarray, p: AugParams) -> np.ndarray:
        """Apply one draw to an (H,W,3) uint8 image (the transforms in the Compose order)."""
        out = img
        if p.color:
            out = brightness_contrast_uint8(out, p.alpha, p.beta)
            out = shift_hsv_uint8(out, p.hue, p.sat, p.val)
        if p.gray:
            out = to_gray_uint8(out)
        if p.ksize:
            out = gaussian_blur_uint8(out, p.ksize)
        return np.ascontiguousarray(out)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.apply(img, self.draw())


def build_strong_aug(seed: int | None = None) -> StrongAug:
    """The reference's strong augmentation (albumentations 1.3 semantics), seeded with ``seed``."""
    return StrongAug(seed)


def strong_augment(img: torch.Tensor, aug: StrongAug) -> torch.Tensor:
    """Colour-augment a normalised batch ``(B,3,H,W)`` as the reference: de-normalise to [0,255], swap
    R/B (the reference applies cv2 BGR2RGB to an RGB image, so HSV/ToGray act on BGR), truncate to
    uint8, augment, swap back, /255, normalise. Returns a new contiguous float tensor on ``img``'s
    device (a channels-last result crashes DeepLabV2's CPU backward in torch 2.14)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = ((img.detach().float().cpu() * std + mean) * 255.0).permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(x.shape[0]):
        bgr = cv2.cvtColor(x[i], cv2.COLOR_BGR2RGB).astype(np.uint8)  # astype truncates, as the reference
        out[i] = cv2.cvtColor(aug(bgr), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    y = (torch.from_numpy(out).permute(0, 3, 1, 2).contiguous() - mean) / std
    return y.to(img.device, dtype=img.dtype).contiguous()


def boundary_map(alpha: np.ndarray, size: int = 1) -> np.ndarray:
    """dilate(alpha) - erode(alpha) with a (2·size+1)² ones kernel (cv2, one iteration); zero when alpha
    is constant. alpha, result: ``(H, W)`` uint8 {0, 1}."""
    if alpha.min() == alpha.max():
        return np.zeros_like(alpha)
    k = np.ones((2 * size + 1, 2 * size + 1), np.uint8)
    return cv2.dilate(alpha, k, iterations=1) - cv2.erode(alpha, k, iterations=1)


def _choose_classes(src_label: np.ndarray, ignore_bg: bool) -> np.ndarray:
    cls = np.unique(src_label)
    drop = [IGNORE, 0] if ignore_bg else [IGNORE]
    cls = cls[~np.isin(cls, drop)]
    k = int(math.ceil(len(cls) / 2))
    return np.random.choice(cls, k, replace=False) if k > 0 else cls


def class_mix_batch(img: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, st: BECOSettings,
                    warm: bool, online_label: torch.Tensor | None = None,
                    online_mask: torch.Tensor | None = None):
    """Class-mix, the second step of a BECO training step. Pairs (i, i + B/2); outputs in the order
    [mix(a_i <- b_i), mix(b_i <- a_i)] for every pair. Each output mixes with probability ``mix_prob``
    (``random.random()``); unmixed outputs keep the target's offline label and mask and a zero boundary.

    Warm-up (``warm``): classes from the source's offline label; image, label, mask mixed; boundary 0.
    After warm-up: classes from the source's confident online label; the mixed sample's label/mask are
    the mixed ONLINE ones and its boundary is dilate-erode of the pasted region.
    An odd last sample (not in the reference, which needs an even batch) is passed through unmixed.

    Returns image (B,3,H,W), label (B,H,W) int64, mask (B,H,W), boundary (B,H,W) float32.
    """
    b = img.shape[0]
    half = b // 2
    lab_np = label.cpu().numpy()
    if not warm:
        on_lab_np = online_label.cpu().numpy()
        on_conf_np = online_mask.cpu().numpy().astype(bool)
    imgs, labs, msks, bds = [], [], [], []
    zero_bd = torch.zeros(label.shape[1:], dtype=torch.float32, device=img.device)
    order = []
    for i in range(half):
        order += [(i, i + half), (i + half, i)]
    for tgt, src in order:
        if random.random() < st.mix_prob:
            if warm:
                src_sel = lab_np[src]
            else:
                src_sel = np.where(on_conf_np[src], on_lab_np[src], IGNORE)
            chosen = _choose_classes(src_sel, st.ignore_bg)
            alpha_np = np.isin(src_sel, chosen).astype(np.uint8)
            a = torch.from_numpy(alpha_np).to(img.device)
            a_img = a.to(img.dtype)[None]
            imgs.append(img[tgt] * (1 - a_img) + img[src] * a_img)
            if warm:
                labs.append(torch.where(a.bool(), label[src], label[tgt]))
                msks.append(torch.where(a.bool(), mask[src], mask[tgt]))
                bds.append(zero_bd)
            else:
                labs.append(torch.where(a.bool(), online_label[src], online_label[tgt]))
                msks.append(torch.where(a.bool(), online_mask[src], online_mask[tgt]).to(mask.dtype))
                bds.append(torch.from_numpy(boundary_map(alpha_np, st.bdry_size)).to(img.device, torch.float32))
        else:
            imgs.append(img[tgt])
            labs.append(label[tgt])
            msks.append(mask[tgt])
            bds.append(zero_bd)
    if b % 2:
        imgs.append(img[b - 1])
        labs.append(label[b - 1])
        msks.append(mask[b - 1])
        bds.append(zero_bd)
    return torch.stack(imgs), torch.stack(labs), torch.stack(msks), torch.stack(bds)


def beco_losses(logits1: torch.Tensor, logits2: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
                bdry: torch.Tensor, st: BECOSettings) -> dict[str, torch.Tensor]:
    """The four BECO terms (each a mean over all B·H·W pixels; ignored pixels contribute 0):
    confident pixels learn ``label``, unconfident pixels learn the other net's argmax; boundary pixels
    are weighted 1 + w·bdry with w = ``bdry_whb`` (loss_ce1), ``bdry_whi`` (loss_ce2), ``bdry_wlb``
    (loss_cot1), ``bdry_wli`` (loss_cot2). logits: (B,C,H,W); label/mask/bdry: (B,H,W)."""
    m = mask.float()
    p1 = logits1.detach().argmax(1)
    p2 = logits2.detach().argmax(1)
    ce = lambda lg, y: F.cross_entropy(lg.float(), y, ignore_index=IGNORE, reduction="none")  # noqa: E731
    out = {
        "loss_ce1": (ce(logits1, label) * m * (1 + st.bdry_whb * bdry)).mean(),
        "loss_ce2": (ce(logits2, label) * m * (1 + st.bdry_whi * bdry)).mean(),
        "loss_cot1": (ce(logits1, p2) * (1 - m) * (1 + st.bdry_wlb * bdry)).mean(),
        "loss_cot2": (ce(logits2, p1) * (1 - m) * (1 + st.bdry_wli * bdry)).mean(),
    }
    out["loss"] = out["loss_ce1"] + out["loss_ce2"] + out["loss_cot1"] + out["loss_cot2"]
    return out


def check_batch(img: torch.Tensor, label: torch.Tensor, mask: torch.Tensor):
    """Validate a training batch and return it contiguous: img (B,3,H,W) float32, label and mask
    (B,H,W) int64. Raises :class:`DataError` naming what differs (a wrong dtype would change the
    losses silently; a channels-last image crashes DeepLabV2's CPU backward in torch 2.14)."""
    problems = []
    if img.dtype != torch.float32 or img.dim() != 4 or img.shape[1] != 3:
        problems.append(f"images must be float32 (B,3,H,W), got {img.dtype} {tuple(img.shape)}")
    for what, t in (("labels", label), ("masks", mask)):
        if t.dtype != torch.int64 or t.dim() != 3 or (img.dim() == 4 and t.shape != (img.shape[0], *img.shape[2:])):
            problems.append(f"{what} must be int64 (B,H,W) matching the images, got {t.dtype} {tuple(t.shape)}")
    if problems:
        raise DataError("BECO training batch: " + "; ".join(problems) +
                        " (segmentation.beco.datasets.PseudoMaskTrainSet yields this layout)")
    return img.contiguous(), label.contiguous(), mask.contiguous()


class BECO(nn.Module):
    """Two networks + the BECO step. ``network1``/``network2`` may be replaced by DDP wrappers;
    ``epoch`` (completed training epochs) drives the warm-up and is saved in checkpoints."""

    def __init__(self, network1: nn.Module, network2: nn.Module, settings: BECOSettings) -> None:
        super().__init__()
        self.network1 = network1
        self.network2 = network2
        self.settings = settings
        self.epoch = 0
        self.aug = build_strong_aug() if settings.mix_aug else None

    def nets_state_dict(self) -> dict[str, dict]:
        """``{'network1': sd, 'network2': sd}`` without wrapper prefixes (the best_ckpt layout)."""
        return {"network1": unwrap(self.network1).state_dict(), "network2": unwrap(self.network2).state_dict()}

    def reseed_aug(self, seed: int) -> None:
        """Restart the augmentation RNG (per epoch, so that a resumed run repeats the same epochs)."""
        if self.aug is not None:
            self.aug.set_random_seed(int(seed))

    @torch.no_grad()
    def online_labels(self, img: torch.Tensor, autocast: contextlib.AbstractContextManager | None = None):
        """Both nets in eval mode on the un-mixed batch: mean upsampled logits -> softmax ->
        (argmax label (B,H,W), confident mask max p > highres_t (B,H,W) int64). Nets back to train."""
        self.network1.eval()
        self.network2.eval()
        with autocast or contextlib.nullcontext():
            lg = (self.network1(img)["logits"].float() + self.network2(img)["logits"].float()) / 2
        prob = torch.softmax(lg, dim=1)
        conf, lab = prob.max(1)
        self.network1.train()
        self.network2.train()
        return lab, (conf > self.settings.highres_t).long()

    def train_step(self, img: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
                   autocast: contextlib.AbstractContextManager | None = None) -> dict[str, torch.Tensor]:
        """One BECO forward on a batch; returns the losses (``loss`` = total, to be back-propagated).
        img (B,3,H,W) float32, label (B,H,W) int64, mask (B,H,W) int64 (see :func:`check_batch`)."""
        img, label, mask = check_batch(img, label, mask)
        st = self.settings
        warm = self.epoch < st.warm_up
        on_lab = on_msk = None
        if not warm:
            on_lab, on_msk = self.online_labels(img, autocast)
        x, y, m, bd = class_mix_batch(img, label, mask, st, warm, on_lab, on_msk)
        if self.aug is not None:
            x = strong_augment(x, self.aug)
        with autocast or contextlib.nullcontext():
            l1 = self.network1(x)["logits"]
            l2 = self.network2(x)["logits"]
        return beco_losses(l1, l2, y, m, bd, st)

    @torch.no_grad()
    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """Validation prediction: mean of both nets' upsampled logits (B,C,H,W)."""
        return (self.network1(img)["logits"].float() + self.network2(img)["logits"].float()) / 2

    @torch.no_grad()
    def test_forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_cat_test``: (mean logits (B,C,H,W), mean pre_logits or, with ``test_msc``, their
        pixel-wise max over [1.0 pass] + each scale p of ``F.interpolate(x, scale_factor=p)``, every
        scale's averaged pre_logits resized (bilinear) to the 1.0 size)."""
        o1, o2 = self.network1(img), self.network2(img)
        logits = (o1["logits"].float() + o2["logits"].float()) / 2
        pre = (o1["pre_logits"].float() + o2["pre_logits"].float()) / 2
        if not self.settings.test_msc:
            return logits, pre
        maps = [pre]
        for p in self.settings.msc_scales:
            if float(p) == 1.0:
                # interpolate(scale_factor=1) is the identity, so the reference's second 1.0 pass is
                # this very array; reusing it saves a forward without changing the max.
                maps.append(pre)
                continue
            xp = F.interpolate(img, scale_factor=float(p), mode="bilinear", align_corners=False)
            pp = (self.network1(xp)["pre_logits"].float() + self.network2(xp)["pre_logits"].float()) / 2
            maps.append(F.interpolate(pp, size=pre.shape[-2:], mode="bilinear", align_corners=False))
        return logits, torch.stack(maps).max(0).values
