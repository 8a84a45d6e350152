"""The BECO co-training model (stage2.md §2.5, §2.7, §2.8): two DeepLabV2 networks, class-mix with the
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

from tools.imutils import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BECOSettings", "BECO", "unwrap", "build_strong_aug", "strong_augment", "boundary_map",
           "class_mix_batch", "beco_losses"]

IGNORE = 255


@dataclass
class BECOSettings:
    """``model.settings`` of the run (main.py values, stage2.md §2.2). ``bdry_whi``/``bdry_wli`` weight
    the (dead) "inside" region in the reference and are kept only to mirror its config."""

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


def build_strong_aug(seed: int | None = None):
    """The reference's albumentations pipeline with library defaults:
    Compose([Compose([RandomBrightnessContrast(p=1), HueSaturationValue(p=1)], p=0.8), ToGray(p=0.2),
    GaussianBlur(5, p=0.5)])."""
    import albumentations as A

    kw = {} if seed is None else {"seed": int(seed)}
    return A.Compose([A.Compose([A.RandomBrightnessContrast(p=1), A.HueSaturationValue(p=1)], p=0.8),
                      A.ToGray(p=0.2), A.GaussianBlur(5, p=0.5)], **kw)


def strong_augment(img: torch.Tensor, aug) -> torch.Tensor:
    """Colour-augment a normalised batch ``(B,3,H,W)`` as the reference: de-normalise to [0,255], swap
    R/B (the reference applies cv2 BGR2RGB to an RGB image, so HSV/ToGray act on BGR), truncate to
    uint8, augment, swap back, /255, normalise. Returns a new tensor on ``img``'s device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = ((img.detach().float().cpu() * std + mean) * 255.0).permute(0, 2, 3, 1).numpy()
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(x.shape[0]):
        bgr = cv2.cvtColor(np.ascontiguousarray(x[i]), cv2.COLOR_BGR2RGB).astype(np.uint8)  # astype truncates, as the reference
        aug_img = aug(image=bgr)["image"]
        out[i] = cv2.cvtColor(aug_img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    y = (torch.from_numpy(out).permute(0, 3, 1, 2) - mean) / std
    return y.to(img.device, dtype=img.dtype)


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
    """Class-mix (stage2.md §2.5 step 2). Pairs (i, i + B/2); outputs in the order
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
    confident pixels learn ``label`` (boundary ×(1+bdry_whb)), unconfident pixels learn the other
    net's argmax (boundary ×(1+bdry_wlb)). logits: (B,C,H,W); label/mask/bdry: (B,H,W)."""
    m = mask.float()
    p1 = logits1.detach().argmax(1)
    p2 = logits2.detach().argmax(1)
    ce = lambda lg, y: F.cross_entropy(lg.float(), y, ignore_index=IGNORE, reduction="none")  # noqa: E731
    w_hi = 1 + st.bdry_whb * bdry
    w_lo = 1 + st.bdry_wlb * bdry
    out = {
        "loss_ce1": (ce(logits1, label) * m * w_hi).mean(),
        "loss_ce2": (ce(logits2, label) * m * w_hi).mean(),
        "loss_cot1": (ce(logits1, p2) * (1 - m) * w_lo).mean(),
        "loss_cot2": (ce(logits2, p1) * (1 - m) * w_lo).mean(),
    }
    out["loss"] = out["loss_ce1"] + out["loss_ce2"] + out["loss_cot1"] + out["loss_cot2"]
    return out


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
        if self.aug is not None and hasattr(self.aug, "set_random_seed"):
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
        """One BECO forward on a batch; returns the losses (``loss`` = total, to be back-propagated)."""
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
