"""KTSE / KTSE+ stage-one training logic (docs/ktse_plus.md; the reference behaviour kept is listed in
docs/deviations.md).

Contents:
- helpers: :func:`max_norm`, :func:`denormalize_img2`, :func:`refine_cams_with_bkg_v2`;
- losses: :func:`get_seg_loss`, :func:`get_seg_loss2`, :func:`local_align_loss`, :func:`kt_loss`,
  :func:`global_align_loss`, and the KTSE+ activation-leakage-suppression terms
  :func:`als_cross_loss`, :func:`als_bg_loss`;
- :data:`LOSS_TERMS`: the one declaration of the terms a step returns (and the log prints);
- :class:`KTSEConfig`: the loss settings by name (:meth:`KTSEConfig.from_flags` maps train.py's reference flags);
- :class:`KTSEStep`: an ``nn.Module`` whose forward runs one whole KTSE update's forwards and returns
  every loss term (so DDP sees a single forward per backward);
- :class:`PolyOptimizer`: the reference SGD + poly schedule, including its momentum-slot quirk.

Shapes: B batch, H x W image, h x w = ceil(H/8) x ceil(W/8) CAM size, C foreground classes (the dataset
descriptor's; 20 for VOC).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.par import PAR
from tools.imutils import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "KTSEConfig", "KTSEStep", "PolyOptimizer", "build_optimizer",
    "max_norm", "denormalize_img2", "refine_cams_with_bkg_v2",
    "get_seg_loss", "get_seg_loss2", "local_align_loss", "kt_loss", "global_align_loss",
    "als_cross_loss", "als_bg_loss", "build_par", "LossTerm", "LOSS_TERMS", "LOSS_NAMES", "REFERENCE_LOG",
    "logged_terms", "loss_log_line",
]

IGNORE_INDEX = 255
#: the margin KTSE's alignment terms use (and ALS reuses)
DELTA = 0.05
#: number of image pairs stacked for simulated inter-image erasing
NUM_PAIR = 4


@dataclass(frozen=True)
class LossTerm:
    """One value a training step returns: ``name`` (its key, ``loss_*``), what it is, whether it is one of
    the reference log line's names, and whether the log prints it."""

    name: str
    meaning: str
    reference_log: bool = False
    logged: bool = True


#: The terms :class:`KTSEStep` returns, in log order: the reference log line's eight names first (with the
#: values the reference logs), then this implementation's. A new loss = one line here, its value in
#: :meth:`KTSEStep.forward`, its weight as a :class:`KTSEConfig` field; the training log and tensorboard
#: show whatever the step returns (:func:`logged_terms`), so train.py does not change.
LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("loss_cls", "the total loss (reference aliasing; the classification loss before the KTSE terms start)",
             reference_log=True),
    LossTerm("loss_kt", "knowledge transfer on the stacked pair", reference_log=True),
    LossTerm("loss_seg", "pseudo-label segmentation loss of image 1, inter-class term included", reference_log=True),
    LossTerm("loss_inter", "inter-class term of the segmentation loss", reference_log=True),
    LossTerm("loss_global_align", "global alignment, weighted by global_align_weight", reference_log=True),
    LossTerm("loss_local_align", "local alignment", reference_log=True),
    LossTerm("loss_seg_fg", "foreground cross-entropy of single-class images", reference_log=True),
    LossTerm("loss_seg_two", "segmentation loss of the stacked pair", reference_log=True),
    LossTerm("loss_bce", "classification loss alone, weighted by cls_weight"),
    LossTerm("loss_als_cross", "KTSE+ cross-image leakage (unweighted)"),
    LossTerm("loss_als_bg", "KTSE+ background leakage (unweighted)"),
    LossTerm("loss_total", "the total loss, detached (the same value as the returned 'loss')", logged=False),
)
LOSS_NAMES = tuple(t.name for t in LOSS_TERMS)
#: the names of the reference's log line, in its order
REFERENCE_LOG = tuple(t.name for t in LOSS_TERMS if t.reference_log)
#: returned keys the log skips: the tensor to backward and its detached copy
_NOT_LOGGED = frozenset({"loss"} | {t.name for t in LOSS_TERMS if not t.logged})


def logged_terms(out: Mapping[str, Any]) -> dict[str, float]:
    """The values a step returned that the log prints, as floats, in the step's order: every key but
    ``loss`` (the tensor to backward) and terms declared ``logged=False``."""
    return {k: float(v) for k, v in out.items() if k not in _NOT_LOGGED}


def loss_log_line(means: Mapping[str, float]) -> str:
    """The training log line: the reference's names present in ``means`` in the reference's order
    (``loss_cls : v, loss_kt : v, ...``), then ``' | '`` and every other term in ``means``' order."""
    ref = [k for k in REFERENCE_LOG if k in means]
    rest = [k for k in means if k not in REFERENCE_LOG]
    return (", ".join(f"{k} : {round(means[k], 5)}" for k in ref) + " | "
            + ", ".join(f"{k} : {round(means[k], 5)}" for k in rest))


def _up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize, align_corners=False (the reference's default everywhere in the step)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def build_par() -> PAR:
    """PAR as model_ktse builds it: 10 iterations, dilations [1, 2, 4, 8, 12, 24]."""
    return PAR(num_iter=10, dilations=[1, 2, 4, 8, 12, 24])


# --------------------------------------------------------------------------------------- helpers
def max_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel min-max normalisation of ReLU(t): (B,C,h,w) -> (B,C,h,w) in [0,1).

    ``ReLU(t' - min - 1e-5) / (max - min + 1e-5)`` with t' = ReLU(t).
    """
    t = F.relu(t)
    b, c = t.shape[:2]
    flat = t.reshape(b, c, -1)
    mn = flat.min(dim=-1)[0].reshape(b, c, 1, 1)
    mx = flat.max(dim=-1)[0].reshape(b, c, 1, 1)
    return F.relu(t - mn - 1e-5) / (mx - mn + 1e-5)


def denormalize_img2(imgs: torch.Tensor) -> torch.Tensor:
    """Normalised (B,3,H,W) RGB -> [0,1] float in **BGR order**, truncated to uint8 steps.

    Faithful to the reference (BGR order; truncation rather than rounding). Values are clamped to
    [0,255] before the uint8 cast, which changes nothing for inputs that came from uint8 images (the
    reference's unclamped cast wraps out-of-range values, which never occur for real images).
    """
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    out = torch.stack([imgs[:, 2] * float(std[2]) + float(mean[2]),
                       imgs[:, 1] * float(std[1]) + float(mean[1]),
                       imgs[:, 0] * float(std[0]) + float(mean[0])], dim=1)
    out = (out * 255).clamp(0, 255).to(torch.uint8)
    return out.float() / 255


@torch.no_grad()
def refine_cams_with_bkg_v2(par: PAR, images: torch.Tensor, cams: torch.Tensor, cls_labels: torch.Tensor,
                            rcam_t: Sequence[float] = (0.3, 0.15), down_scale: int = 2,
                            return_par: bool = False):
    """PAR-refined pseudo labels, as the reference builds them.

    Args:
        par: the PAR module.
        images: (B,3,H,W) denormalised images (:func:`denormalize_img2`).
        cams: (B,C,h,w) raw CAMs (may be negative).
        cls_labels: (B,C) multi-hot labels.
        rcam_t: (high, low) constant background levels.
    Returns:
        (B,H,W) float tensor with values 0 (background), k+1 (class k), 255 (ignored);
        with ``return_par`` also the list of PAR outputs (per image: high, low).
    """
    b, _, h, w = images.shape
    hs, ws = h // down_scale, w // down_scale
    # Faithful quirk: normalise by the raw per-channel max (no ReLU first).
    cams = cams / (F.adaptive_max_pool2d(cams, (1, 1)) + 1e-5)
    small = _up(images, (hs, ws))
    cams = _up(cams, (h, w))
    stacks = []
    for t in rcam_t[:2]:
        bkg = torch.full((b, 1, h, w), float(t), dtype=cams.dtype, device=cams.device)
        stacks.append(_up(torch.cat([bkg, cams], dim=1), (hs, ws)))
    bkg_cls = torch.ones(b, 1, dtype=cls_labels.dtype, device=cls_labels.device)
    keys_all = torch.cat([bkg_cls, cls_labels], dim=1)
    labels = [torch.empty(b, h, w, device=cams.device) for _ in stacks]
    par_outs = []
    for i in range(b):
        keys = torch.nonzero(keys_all[i])[:, 0]
        # both background levels share the image and the keys: one PAR call on a batch of 2
        probs = torch.stack([stack[i, keys] for stack in stacks]).softmax(dim=1)
        refined = par(small[i:i + 1].expand(len(stacks), -1, -1, -1), probs)
        par_outs.extend(refined[j:j + 1] for j in range(len(stacks)))
        idx = _up(refined, (h, w)).argmax(dim=1)
        for j in range(len(stacks)):
            labels[j][i] = keys[idx[j]].float()
    label_h, label_l = labels
    out = label_h.clone()
    out[label_h == 0] = IGNORE_INDEX
    out[(label_h + label_l) == 0] = 0
    return (out, par_outs) if return_par else out


# ---------------------------------------------------------------------------------------- losses
def _ce(pred: torch.Tensor, label: torch.Tensor, ce_log: list | None, safe: bool = False) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels; NaN when all are ignored (faithful) unless ``safe``
    (then 0 with a zero gradient, so one bad batch cannot turn every weight into NaN)."""
    if safe and not bool((label != IGNORE_INDEX).any()):
        v = pred.sum() * 0.0
        if ce_log is not None:
            ce_log.append(v.detach())
        return v
    v = F.cross_entropy(pred, label, ignore_index=IGNORE_INDEX)
    if ce_log is not None:
        ce_log.append(v.detach())
    return v


def get_seg_loss2(pred: torch.Tensor, label: torch.Tensor, ce_log: list | None = None,
                  safe: bool = False) -> torch.Tensor:
    """Background CE + 0.0125 * foreground CE, the reference's weighting. pred (B,C+1,H,W), label (B,H,W) long.

    Cross-entropy over only-ignored pixels is NaN (faithful) unless ``safe``.
    """
    bg_label = label.clone()
    bg_label[label != 0] = IGNORE_INDEX
    bg = _ce(pred, bg_label, ce_log, safe)
    fg_label = label.clone()
    fg_label[label == 0] = IGNORE_INDEX
    fg = _ce(pred, fg_label, ce_log, safe)
    return bg + 0.0125 * fg


def get_seg_loss(pred: torch.Tensor, label: torch.Tensor, cls_label: torch.Tensor, cam_fg: torch.Tensor,
                 ce_log: list | None = None, safe: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pseudo-label segmentation loss with the reference's inter-class term.

    Args:
        pred: (B,C+1,H,W) scores (KTSE passes ReLU-ed upsampled cam_seg).
        label: (B,H,W) long pseudo label (0, k+1, 255).
        cls_label: (B,C) multi-hot.
        cam_fg: (B,1,H,W) normalised foreground map (fg_full).
        safe: an all-ignored cross-entropy gives 0 instead of NaN (fix; the reference gives NaN).
    Returns:
        (seg, bg, fg, inter); ``bg`` is the same tensor as ``seg`` (the reference's in-place aliasing,
        so its logged "bg" value is the full loss).
    """
    bg_label = label.clone()
    bg_label[label != 0] = IGNORE_INDEX
    seg = _ce(pred, bg_label, ce_log, safe)
    n_cls = cls_label.sum(dim=1)
    single = n_cls == 1
    multi = n_cls > 1
    if bool(single.any()):
        fg_label = label[single].clone()
        fg_label[fg_label == 0] = IGNORE_INDEX
        fg = _ce(pred[single], fg_label, ce_log, safe)
        seg = seg + 0.0125 * fg
    else:
        fg = torch.zeros(1, device=pred.device)
    if bool(multi.any()):
        p = pred[multi, 1:]
        m1 = p.max(dim=1, keepdim=True)[0]
        m2 = (p * (p != m1)).max(dim=1, keepdim=True)[0]
        mask = (cam_fg[multi] > 0.2).float()
        inter = ((m2 - m1.detach()) * mask).sum() / (mask.sum() + 1e-5)
        seg = seg + 0.005 * inter
    else:
        inter = torch.zeros(1, device=pred.device)
    return seg, seg, fg, inter


def local_align_loss(cam_masked: torch.Tensor, cam: torch.Tensor, m_small: torch.Tensor,
                     label: torch.Tensor) -> torch.Tensor:
    """mean over (B,C,h,w) of ReLU(cam_m*m - cam*m - 0.05)*y; m (B,1,h,w) low-activation mask."""
    y = label[:, :, None, None]
    return (F.relu(cam_masked * m_small - cam * m_small - DELTA) * y).mean()


def kt_loss(cam_mix: torch.Tensor, cam_two: torch.Tensor, label_mix: torch.Tensor) -> torch.Tensor:
    """Knowledge transfer: mean of ReLU(C_mix - cam_two - 0.05)*y_mix over (P,C,2h,w)."""
    return (F.relu(cam_mix - cam_two - DELTA) * label_mix[:, :, None, None]).mean()


def global_align_loss(cam_masked: torch.Tensor, cam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """mean over (B,C) of |GAP(ReLU(cam_m))*y - GAP(ReLU(cam))*y| (before the W1 weight)."""
    g_m = F.relu(cam_masked).mean(dim=(2, 3)) * label
    g = F.relu(cam).mean(dim=(2, 3)) * label
    return (g_m - g).abs().mean()


def als_cross_loss(cam_two: torch.Tensor, label1: torch.Tensor, label2: torch.Tensor,
                   delta: float = DELTA) -> torch.Tensor:
    """KTSE+ cross-image leakage (docs/ktse_plus.md).

    Args:
        cam_two: (P,C,2h,w) raw CAM of the stacked pair (image 1 rows first).
        label1, label2: (P,C) labels of the top / bottom image.
    Returns: mean over (P,C,2h,w) of ReLU(cam_two - delta) * leak_mask, where leak_mask marks the
    bottom half for classes only in image 1 and the top half for classes only in image 2.
    """
    p, c, hh, w = cam_two.shape
    h = hh // 2
    only1 = (label1 > 0) & (label2 <= 0)
    only2 = (label2 > 0) & (label1 <= 0)
    rows = torch.arange(hh, device=cam_two.device)
    top = (rows < h).to(cam_two.dtype)[None, None, :, None]
    bottom = 1.0 - top
    mask = only1.to(cam_two.dtype)[:, :, None, None] * bottom + only2.to(cam_two.dtype)[:, :, None, None] * top
    return (F.relu(cam_two - delta) * mask).mean()


def als_bg_loss(cam: torch.Tensor, pseudo: torch.Tensor, label: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """KTSE+ background leakage (docs/ktse_plus.md).

    Args:
        cam: (B,C,h,w) raw CAM.
        pseudo: (B,H,W) refined pseudo label; confident background = 0.
        label: (B,C) multi-hot.
    Returns: sum of ReLU(max_norm(cam)_c - delta) * bg * y_c / (sum bg * y_c + 1e-5).
    """
    cam_norm = _up(max_norm(cam), pseudo.shape[-2:])
    bg = (pseudo == 0).to(cam_norm.dtype)[:, None]
    weight = bg * label[:, :, None, None]
    return (F.relu(cam_norm - delta) * weight).sum() / (weight.sum() + 1e-5)


# ------------------------------------------------------------------------------------- the step
@dataclass
class KTSEConfig:
    """Loss settings of one update, by name. train.py keeps the reference's flags; :meth:`from_flags` is
    the one place that maps them (``--W``, ``--TH``, ``--T``, ``--RCAM_T``) onto these fields."""

    #: weight of the classification loss (``--W`` first value)
    cls_weight: float = 1.0
    #: weight of the global alignment (``--W`` second value); 0 also switches every KTSE term off, as the reference
    global_align_weight: float = 1.0
    #: pixels whose normalised foreground CAM is below this are kept by the intra-image erasing (``--TH`` first value)
    erase_threshold: float = 0.6
    #: epoch from which the KTSE terms are on (``--T``)
    ktse_start_epoch: int = 10
    #: constant background scores (high, low) of the PAR pseudo labels (``--RCAM_T``)
    pseudo_bg_thresholds: Sequence[float] = (0.3, 0.15)
    #: KTSE+ cross-image leakage weight (0 = off)
    als_cross: float = 1.0
    #: KTSE+ background leakage weight (0 = off)
    als_bg: float = 0.1
    #: image pairs stacked for the simulated inter-image erasing
    num_pair: int = NUM_PAIR
    #: fix: an all-ignored pseudo-label cross-entropy gives 0, not NaN (reference: NaN)
    safe_ce: bool = False

    @classmethod
    def from_flags(cls, flags: Any) -> "KTSEConfig":
        """The config of train.py's parsed flags (an ``argparse.Namespace``): ``--W w0 w1 [...]`` ->
        cls_weight, global_align_weight; ``--TH th [...]`` -> erase_threshold; ``--T`` -> ktse_start_epoch;
        ``--RCAM_T`` -> pseudo_bg_thresholds; ``--als_cross``, ``--als_bg``, ``--safe_ce`` as named. The
        reference's further values of ``--W`` and ``--TH`` are read by nothing and dropped."""
        from tools.errors import DataError

        if len(flags.W) < 2:
            raise DataError(f"--W {' '.join(map(str, flags.W))}: needs two values at least (the classification "
                            "weight and the global-alignment weight), e.g. --W 1 1")
        return cls(cls_weight=float(flags.W[0]), global_align_weight=float(flags.W[1]),
                   erase_threshold=float(flags.TH[0]), ktse_start_epoch=int(flags.T),
                   pseudo_bg_thresholds=tuple(flags.RCAM_T), als_cross=float(flags.als_cross),
                   als_bg=float(flags.als_bg), safe_ce=bool(flags.safe_ce))


class KTSEStep(nn.Module):
    """One KTSE(+) update's forward passes and losses (reference ``model_WSSS.update``).

    ``forward(img, img2, label, label2, epo)`` -> dict with ``loss`` (the tensor to backward) and every
    term of :attr:`terms`, detached (:data:`LOSS_TERMS`; zeros before the KTSE terms start).
    ``loss_cls`` and ``loss_seg`` carry the reference's logged (aliased) values: the total loss and the
    full seg loss; ``loss_bce`` is the pure classification term. With ``record`` a dict is also filled with intermediate tensors
    (forward outputs, pseudo labels, cross-entropy calls) for parity tests.

    img, img2: (B,3,H,W) normalised, H a multiple of 8; label, label2: (B,C) float.
    """

    #: the terms :meth:`forward` returns (a subclass adding a term extends this)
    terms: tuple[LossTerm, ...] = LOSS_TERMS

    def __init__(self, net: nn.Module, par: PAR | None = None, cfg: KTSEConfig | None = None) -> None:
        super().__init__()
        self.net = net
        self.par = par if par is not None else build_par()
        self.cfg = cfg if cfg is not None else KTSEConfig()

    @classmethod
    def from_flags(cls, net: nn.Module, flags: Any) -> "KTSEStep":
        """The step train.py builds (models/registry.py): PAR as the reference, config from the flags."""
        return cls(net, build_par(), KTSEConfig.from_flags(flags))

    def forward(self, img: torch.Tensor, img2: torch.Tensor, label: torch.Tensor, label2: torch.Tensor,
                epo: int, record: dict | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        B, _, H, W = img.shape
        w0, w1 = float(cfg.cls_weight), float(cfg.global_align_weight)
        th = float(cfg.erase_threshold)
        active = w1 > 0 and epo >= cfg.ktse_start_epoch
        zero = torch.zeros((), device=img.device)

        cam, out, _gpp, cam_seg = self.net(img)
        if active:
            cam2, _out2, _gpp2, _cam_seg2 = self.net(img2)
        cam, out, cam_seg = cam.float(), out.float(), cam_seg.float()
        if record is not None:
            record["main"] = (cam, out, _gpp, cam_seg)

        y = label.float()
        fg_small = (max_norm(cam) * y[:, :, None, None]).max(dim=1, keepdim=True)[0]
        m_small = (fg_small < th).float()
        fg_full = (max_norm(_up(F.relu(cam), (H, W))) * y[:, :, None, None]).max(dim=1, keepdim=True)[0]
        m_full = (fg_full < th).float()

        loss_bce = w0 * F.binary_cross_entropy_with_logits(out[:B], y)
        logs = {t.name: zero for t in self.terms}
        logs["loss_bce"] = loss_bce.detach()
        if not active:
            logs["loss_cls"] = loss_bce.detach()
            logs["loss_total"] = loss_bce.detach()
            return {**logs, "loss": loss_bce}

        ce_log: list | None = [] if record is not None else None
        cam2 = cam2.float()
        y2 = label2.float()

        # a. intra-image erasing of the confident foreground
        img_m = img * m_full
        cam_m = self.net(img_m)[0].float()
        # b. local alignment
        l_local = local_align_loss(cam_m, cam, m_small, y)
        # c. pseudo labels
        with torch.no_grad(), torch.autocast(device_type=img.device.type, enabled=False):
            p1 = refine_cams_with_bkg_v2(self.par, denormalize_img2(img.float()), cam.detach(), y,
                                         cfg.pseudo_bg_thresholds)
            p2 = refine_cams_with_bkg_v2(self.par, denormalize_img2(img2.float()), cam2.detach(), y2,
                                         cfg.pseudo_bg_thresholds)
        p1l, p2l = p1.long(), p2.long()
        # d. self-supervised segmentation on image 1
        s_pred = _up(F.relu(cam_seg), (H, W))
        seg, _bg, seg_fg, inter = get_seg_loss(s_pred, p1l, y, fg_full, ce_log, cfg.safe_ce)
        # e. simulated inter-image erasing: two images stacked vertically
        n = cfg.num_pair
        x_mix = torch.cat([img[:n], img2[:n]], dim=2)
        cam_two, _o, _g, cam_seg_two = self.net(x_mix)
        cam_two, cam_seg_two = cam_two.float(), cam_seg_two.float()
        c_mix = torch.cat([cam[:n], cam2[:n]], dim=2)
        if c_mix.shape != cam_two.shape:
            raise ValueError(f"stacked CAM {tuple(cam_two.shape)} != paired CAMs {tuple(c_mix.shape)}: "
                             f"the crop size (H={H}) must be a multiple of 8")
        y_mix = torch.maximum(y[:n], y2[:n])
        l_kt = kt_loss(c_mix, cam_two, y_mix)
        # f. segmentation on the stacked pair
        seg_two = get_seg_loss2(_up(F.relu(cam_seg_two), (2 * H, W)), torch.cat([p1l[:n], p2l[:n]], dim=1), ce_log,
                                 cfg.safe_ce)
        # g. global alignment
        l_global = w1 * global_align_loss(cam_m, cam, y)
        total = loss_bce + l_local + seg + l_kt + seg_two + l_global

        # KTSE+ activation leakage suppression
        l_cross = als_cross_loss(cam_two, y[:n], y2[:n]) if cfg.als_cross > 0 else zero
        l_bgl = als_bg_loss(cam, p1, y) if cfg.als_bg > 0 else zero
        if cfg.als_cross > 0 or cfg.als_bg > 0:
            total = total + cfg.als_cross * l_cross + cfg.als_bg * l_bgl

        if record is not None:
            record.update(second=(cam2,), masked_input=img_m, masked_cam=cam_m, mix_input=x_mix,
                          mix=(cam_two, _o, _g, cam_seg_two), pseudo1=p1, pseudo2=p2, ce_calls=ce_log,
                          seg_ret=(seg, _bg, seg_fg, inter), seg2_ret=seg_two)
        d = lambda t: t.detach()  # noqa: E731
        logs.update(loss_cls=d(total), loss_kt=d(l_kt), loss_seg=d(seg), loss_inter=d(inter).reshape(()),
                    loss_global_align=d(l_global), loss_local_align=d(l_local), loss_seg_fg=d(seg_fg).reshape(()),
                    loss_seg_two=d(seg_two), loss_als_cross=d(l_cross), loss_als_bg=d(l_bgl), loss_total=d(total))
        return {**logs, "loss": total}


# ------------------------------------------------------------------------------------ optimizer
class PolyOptimizer(torch.optim.SGD):
    """SGD with the reference poly schedule ``lr = initial_lr * (1 - step/max_step) ** power``.

    Faithful default (``momentum_fix=False``): the reference passes weight decay positionally into
    SGD's momentum slot, so SGD momentum equals ``weight_decay`` (5e-4), and its "momentum" 0.9 is only
    the poly power. ``momentum_fix=True`` uses real momentum 0.9 (a documented deviation).
    Per-group weight decay comes from the groups themselves.
    """

    def __init__(self, params, lr: float, weight_decay: float, max_step: int, momentum: float = 0.9,
                 momentum_fix: bool = False) -> None:
        from tools.runtime import sgd_momentum

        super().__init__(params, lr, momentum=sgd_momentum(0.9, weight_decay, momentum_quirk=not momentum_fix),
                         weight_decay=weight_decay)
        self.global_step = 0
        self.max_step = int(max_step)
        self.momentum = momentum  # poly power, as the reference names it
        self.lr_mult = 1.0
        self._initial_lr = [g["lr"] for g in self.param_groups]
        for g, lr0 in zip(self.param_groups, self._initial_lr):
            g.setdefault("initial_lr", lr0)

    def step(self, closure=None):  # type: ignore[override]
        from tools.runtime import PolySchedule, poly_lr

        sched = PolySchedule.for_optimizer(self, self.max_step, self.momentum, key="initial_lr")
        if sched.apply(self, self.global_step):
            self.lr_mult = poly_lr(1.0, self.global_step, self.max_step, self.momentum)
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict:  # type: ignore[override]
        sd = super().state_dict()
        sd["poly"] = {"global_step": self.global_step, "max_step": self.max_step, "power": self.momentum,
                      "lr_mult": self.lr_mult}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        poly = state_dict.pop("poly", None)
        super().load_state_dict(state_dict)
        if poly is not None:
            self.global_step = int(poly["global_step"])
            self.max_step = int(poly["max_step"])
            self.momentum = float(poly["power"])
            self.lr_mult = float(poly["lr_mult"])


def build_optimizer(net: nn.Module, lr: float, wd: float, max_step: int, momentum_fix: bool = False) -> PolyOptimizer:
    """The reference four groups (1x, 2x no-wd, 10x, 20x no-wd); call before the first ``.train()``."""
    g = net.get_parameter_groups()
    groups = [{"params": g[0], "lr": lr, "weight_decay": wd},
              {"params": g[1], "lr": 2 * lr, "weight_decay": 0},
              {"params": g[2], "lr": 10 * lr, "weight_decay": wd},
              {"params": g[3], "lr": 20 * lr, "weight_decay": 0}]
    return PolyOptimizer(groups, lr=lr, weight_decay=wd, max_step=max_step, momentum_fix=momentum_fix)
