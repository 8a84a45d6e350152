"""GPU acceptance and speed check: does every stage run on this GPU, does it agree with the parity
fixtures there, and how fast is it.

    python bench/gpu_check.py                          # CUDA, reference widths, about 8 minutes on an H100
    python bench/gpu_check.py --device cpu --quick     # the same code at toy widths, under a minute (tests)

Sections (each under its own time cap, a failing one is recorded and the next one runs; the JSON is
always written):

* ``parity`` -- the parity fixtures' forward passes on the device in fp32 with TF32 off (Net_gpp, PAR,
  the KTSE losses and one full KTSE step, the IRN network, the two DeepLabV2 networks and BECO's MSC
  test), as the largest relative error against the fixture next to the fixture's tolerance;
* ``stage1_train`` -- a stage-one training step (batch 8 and 16, crop 320, before and after epoch T);
* ``cam_infer`` -- CAM inference of one 500x375 image at 4 scales x flip;
* ``irn_label`` -- IRN make_cam + boundary map + the random walk (dense and chunked) of a VOC-size image,
  with the walk's measured peak memory next to its estimate (:func:`irn.random_walk.walk_bytes`);
* ``irn_train`` -- an IRN training step (batch 32, crop 512);
* ``beco_train`` -- a BECO training step after the warm-up (two DeepLabV2-R101, crop 512, batch 16 per GPU);
* ``beco_test`` -- BECO's two-network multi-scale test of one 512x512 image;
* ``ddp`` -- one torchrun-style process (tools.runtime, nccl on CUDA) running one DDP step of each trainer.

The timed sections run in fp32 and with AMP (tools.runtime: fp16 + loss scaling on CUDA, bf16 on CPU) and
report images/s (median of the timed repeats after warm-up) and the peak memory
(``torch.cuda.max_memory_allocated``). The table ends with an estimate of the full VOC pipeline's
GPU-hours on this device. Results go to ``bench/results/gpu_<device name>.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._meta import machine_meta, meta_line  # noqa: E402
from tools.errors import DeviceError, run_cli  # noqa: E402
from tools.io import atomic_write_json  # noqa: E402
from tools.misc import backward_step, seed_everything  # noqa: E402
from tools.runtime import (amp_dtype, amp_setup, autocast, poly_sgd, prepare_module, select_device,  # noqa: E402
                           set_backends, to_device)

FIXTURES = ROOT / "tests" / "fixtures" / "reference"
BECO_CONFIG = ROOT / "segmentation" / "configs" / "beco_deeplabv2_voc.json"
#: VOC 2012 set sizes the estimate uses: train_aug (stage one, CAMs, IRN, BECO training) and val (BECO test)
VOC_TRAIN_AUG, VOC_VAL = 10582, 1449
PRECISIONS = ("fp32", "amp")
#: share of --budget_s each section may use (the DDP section's subprocess start included)
SECTION_SHARE = {"parity": 0.12, "stage1_train": 0.22, "cam_infer": 0.07, "irn_label": 0.10, "irn_train": 0.10,
                 "beco_train": 0.20, "beco_test": 0.06, "ddp": 0.13}
SECTIONS = tuple(SECTION_SHARE)


@dataclass(frozen=True)
class Profile:
    """Widths and input sizes of one run: ``full`` = the reference's, ``quick`` = toy (CPU tests)."""

    name: str
    net_width: float          # Net_gpp trunk multiplier
    crop: int                 # stage-one crop
    batches: tuple[int, ...]  # stage-one batches (8 before epoch T, 16 from T on)
    image_hw: tuple[int, int]  # the VOC-size test image (H, W)
    cam_scales: tuple[float, ...]
    irn_width: int
    irn_crop: int
    irn_batch: int
    beco_backbone: str
    beco_width: int
    beco_crop: int
    beco_batch: int
    beco_test: int
    warmup: int
    repeats: int
    ktse_steps: tuple[str, ...]  # the fixture's full KTSE steps checked (reference width, fixture sizes)


FULL = Profile("full", 1.0, 320, (8, 16), (375, 500), (0.5, 1.0, 1.5, 2.0), 64, 512, 32, "resnet101", 64, 512, 16,
               512, 2, 3, ("step", "step0"))
QUICK = Profile("quick", 0.0625, 48, (2, 3), (40, 52), (0.5, 1.0, 1.5, 2.0), 8, 96, 2, "resnet18", 4, 48, 2, 48,
                1, 1, ("step0",))


# ---------------------------------------------------------------------------------------------- plumbing
class SectionBudgetSpent(Exception):
    """The section's time cap passed; the configurations left are recorded as skipped."""


class Clock:
    """Deadline of one section."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def check(self) -> None:
        if self.left() <= 0:
            raise SectionBudgetSpent("section time cap reached")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def error_text(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"[:400]


def timed(fn: Callable[[], Any], items: float, device: torch.device, warmup: int, repeats: int,
          clock: Clock) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times (fewer when the section's clock runs out,
    at least one). ``items`` = images per call. Returns images/s of the median call, the spread
    (max-min)/median, every time, the peak device memory since the warm-up started and the memory already
    held before it (weights, optimizer state: the peak minus it is what a call needs)."""
    reset_peak(device)
    before = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if clock.left() <= 0:
            break
    med = statistics.median(times)
    return {"images_per_s": items / med, "s_per_call": med, "s_all": [round(t, 5) for t in times],
            "spread": (max(times) - min(times)) / med, "images_per_call": items, "peak_mem_bytes": peak_bytes(device),
            "mem_before_bytes": before}


def halving_batch(batch: int, attempt: Callable[[int], dict], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``attempt(batch)``; on a CUDA out-of-memory error retry at half the batch (down to 1), so that a rate
    is still measured, and say so in the result (``batch``, ``note``)."""
    b = batch
    while True:
        try:
            res = attempt(b)
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if b <= 1:
                raise
            b //= 2
            continue
        res["batch"] = b
        if b != batch:
            res["note"] = f"batch {batch} ran out of memory; measured at batch {b}"
        return res


def fixture_weights(keys_file: Path, seed: int) -> dict[str, torch.Tensor]:
    """The parity fixtures' deterministic weights (tests/fixtures/reference/weights.py) for a key listing."""
    spec = importlib.util.spec_from_file_location("_fixture_weights", FIXTURES / "weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.load_keys(str(keys_file))
    return {k: torch.from_numpy(v) for k, v in mod.make_state_dict(rows, seed).items()}


def rel_err(got: Any, ref: Any) -> float:
    a = np.asarray(got.detach().float().cpu() if isinstance(got, torch.Tensor) else got, np.float64)
    b = np.asarray(ref, np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matmuls and convolutions (the fixtures are float32 values)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------------------------------------- parity
def _check(errs: dict[str, float], tol: float, extra: dict | None = None) -> dict[str, Any]:
    return {"max_rel": {k: float(v) for k, v in errs.items()}, "tolerance": tol,
            "pass": all(v < tol for v in errs.values()), **(extra or {})}


def parity_net_gpp(device: torch.device, sd: dict) -> dict[str, Any]:
    from models.resnet38d import Net_gpp
    from tools.checkpoint import load_state_dict_checked

    f = np.load(FIXTURES / "stage1" / "net_gpp_forward.npz")
    net = Net_gpp()
    load_state_dict_checked(net, sd, strict=True, what="fixture weights")
    net.to(device).eval()
    errs = {}
    with torch.no_grad():
        for suffix, x in (("", f["x"]), ("_b2", f["x_b2"])):
            for name, got in zip(("cam", "out", "gpp", "cam_seg"), net(torch.from_numpy(x).to(device))):
                errs[name + suffix] = rel_err(got, f[name + suffix])
    return _check(errs, 1e-4)


def parity_par(device: torch.device) -> dict[str, Any]:
    from models.par import PAR

    f = np.load(FIXTURES / "stage1" / "par.npz")
    par = PAR(int(f["num_iter"]), f["dilations"].tolist()).to(device)
    errs = {}
    for img, masks, out in (("img", "masks", "out"), ("img_b2", "masks_b2", "out_b2")):
        with torch.no_grad():
            got = par(torch.from_numpy(f[img]).to(device), torch.from_numpy(f[masks]).to(device))
        errs[out] = rel_err(got, f[out])
    return _check(errs, 1e-4)


def parity_ktse(device: torch.device, sd: dict, steps: tuple[str, ...] = ("step", "step0")) -> dict[str, Any]:
    from models import ktse
    from models.resnet38d import Net_gpp

    fx = np.load(FIXTURES / "stage1" / "losses.npz")

    def t(k: str) -> torch.Tensor:
        return torch.from_numpy(fx[k]).to(device)

    errs: dict[str, float] = {}
    for case in ("mixed", "simple", "complex"):
        ret = ktse.get_seg_loss(t(f"seg_{case}_pred"), t(f"seg_{case}_label"), t(f"seg_{case}_cls_label"),
                                t(f"seg_{case}_cam_fg"), [])
        errs[f"get_seg_loss_{case}"] = rel_err([float(r) for r in ret], fx[f"seg_{case}_out"])
    errs["get_seg_loss2"] = rel_err([float(ktse.get_seg_loss2(t("seg2_pred"), t("seg2_label")))], [fx["seg2_out"]])
    out, _ = ktse.refine_cams_with_bkg_v2(ktse.build_par().to(device), t("refine_images"), t("refine_cams"),
                                          t("refine_cls_labels"), return_par=True)
    # pseudo labels are argmaxes: a tie may flip on another device, so count disagreeing pixels
    mismatch = {"refine_cams_with_bkg_v2": float((out.cpu().numpy() != fx["refine_out"]).mean())}
    net = Net_gpp()
    net.load_state_dict(sd, strict=True)
    net.to(device)
    for pre in steps:
        opt = ktse.build_optimizer(net, lr=0.01, wd=5e-4, max_step=100)
        net.eval()  # the fixture's convention: dropout off
        step = ktse.KTSEStep(net, cfg=ktse.KTSEConfig(als_cross=0.0, als_bg=0.0)).to(device)
        opt.zero_grad()
        res = step(t(pre + "_img_a"), t(pre + "_img_a2"), t(pre + "_label"), t(pre + "_label2"),
                   int(fx[pre + "_epoch"]))
        res["loss"].backward()
        errs[f"{pre}_losses"] = rel_err([float(res[n]) for n in ktse.LOSS_NAMES[:8]],
                                        [float(fx[f"{pre}_{n}"]) for n in ktse.LOSS_NAMES[:8]])
        norms = [p.grad.double().norm().item() for _, p in net.named_parameters() if p.grad is not None]
        errs[f"{pre}_grad_norms"] = rel_err(norms, fx[pre + "_grad_norm"])
        net.zero_grad(set_to_none=True)
    ok = all(v < 1e-4 for v in errs.values()) and all(v <= 1e-3 for v in mismatch.values())
    return _check(errs, 1e-4, {"label_mismatch_fraction": mismatch, "mismatch_tolerance": 1e-3, "pass": ok})


def parity_irn(device: torch.device) -> dict[str, Any]:
    from irn.net.resnet50_irn import EdgeDisplacement, Net, load_irn_weights

    ref = np.load(FIXTURES / "stage2" / "irn_forward.npz")
    sd = fixture_weights(FIXTURES / "stage2" / "irn_keys.json", 0)
    net = Net()
    load_irn_weights(net, sd)
    net.to(device)
    x = torch.from_numpy(ref["x"]).to(device)
    errs = {}
    with torch.no_grad():
        net.eval()
        edge, dp = net(x)
        errs["edge_out"], errs["dp_out"] = rel_err(edge, ref["edge_out"]), rel_err(dp, ref["dp_out"])
        net.train()
        edge, dp = net(x)
        errs["edge_out_train"] = rel_err(edge, ref["edge_out_train"])
        errs["dp_out_train"] = rel_err(dp, ref["dp_out_train"])
        ed = EdgeDisplacement(crop_size=int(ref["ed_crop_size"]), stride=4)
        load_irn_weights(ed, sd)
        e, d = ed.to(device).eval()(torch.from_numpy(ref["x_pair"]).to(device))
        errs["ed_edge"], errs["ed_dp"] = rel_err(e, ref["ed_edge"]), rel_err(d, ref["ed_dp"])
    return _check(errs, 1e-5)


def parity_deeplabv2(device: torch.device) -> dict[str, Any]:
    from segmentation.beco.deeplabv2 import DeepLabV2
    from segmentation.beco.model import BECO, BECOSettings

    d = np.load(FIXTURES / "stage2" / "deeplabv2_forward.npz")
    nets = []
    for seed in (0, 1):
        net = DeepLabV2()
        net.load_state_dict(fixture_weights(FIXTURES / "stage2" / "deeplabv2_keys.json", seed), strict=True)
        nets.append(net)
    model = BECO(nets[0], nets[1], BECOSettings()).to(device).eval()
    x = torch.from_numpy(d["x"]).to(device)
    with torch.no_grad():
        o1, o2 = model.network1(x), model.network2(x)
        logits, pre_msc = model.test_forward(x)
    errs = {"feat_layer4": rel_err(o1[4], d["feat_layer4"]), "pre_logits": rel_err(o1["pre_logits"], d["pre_logits"]),
            "logits": rel_err(o1["logits"], d["logits"]),
            "net2_pre_logits": rel_err(o2["pre_logits"], d["net2_pre_logits"]),
            "beco_logits_avg": rel_err(logits, d["beco_logits_avg"]),
            "beco_pre_logits_msc": rel_err(pre_msc, d["beco_pre_logits_msc"])}
    return _check(errs, 1e-4)


def section_parity(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    with strict_fp32():
        sd = fixture_weights(FIXTURES / "stage1" / "net_gpp_keys.json", 0)
        checks: list[tuple[str, Callable[[], dict]]] = [
            ("net_gpp", lambda: parity_net_gpp(device, sd)), ("par", lambda: parity_par(device)),
            ("ktse_losses", lambda: parity_ktse(device, sd, prof.ktse_steps)), ("irn", lambda: parity_irn(device)),
            ("deeplabv2_beco", lambda: parity_deeplabv2(device))]
        for name, fn in checks:
            clock.check()
            t0 = time.perf_counter()
            try:
                out[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
                out[name] = {"pass": False, "error": error_text(e)}
            out[name]["seconds"] = round(time.perf_counter() - t0, 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- timed sections
def _precision_runs(device: torch.device, prof: Profile, clock: Clock, out: dict, configs: list[tuple[str, dict]],
                    run_one: Callable[..., dict]) -> None:
    """For each (config name, kwargs) and each precision: ``out[name][precision]`` = run_one's result, an
    ``{"error": ...}`` (an out-of-memory included), or ``{"skipped": ...}`` once the section's clock ran out.
    A ``precisions`` entry in kwargs limits the precisions of that configuration."""
    for name, kw in configs:
        kw = dict(kw)
        for prec in kw.pop("precisions", PRECISIONS):
            key = out.setdefault(name, {})
            if clock.left() <= 0:
                key[prec] = {"skipped": "section time cap reached"}
                continue
            try:
                key[prec] = run_one(amp=prec == "amp", clock=clock, **kw)
            except Exception as e:  # noqa: BLE001 - record and go on with the next configuration
                key[prec] = {"error": error_text(e)}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# The opt-in speed flags of the trainers, each measured against the plain path ("off") on a fresh model
# built from the same seed; parity = relative difference of the first step's loss (before any update).
SPEED_TOGGLES = {"channels_last": 1e-3, "cudnn_benchmark": 1e-3, "bf16": 5e-2, "compile": 1e-3}


def speed_toggles(device: torch.device, prof: Profile, clock: Clock, items: int,
                  make: Callable[[str], Callable[[], torch.Tensor]]) -> dict[str, Any]:
    """``{toggle: timed result + loss (+ rel_loss_err, parity_ok, speedup)}`` for "off" and each of
    :data:`SPEED_TOGGLES`. ``make(toggle)`` builds a fresh model with that toggle and returns one training
    step returning its loss. channels_last, cudnn_benchmark and compile are CUDA-only here (the trainers
    ignore channels_last on CPU; compiling on CPU would take minutes)."""
    out: dict[str, Any] = {}
    base: dict[str, Any] | None = None
    for toggle in ("off", *SPEED_TOGGLES):
        if clock.left() <= 0:
            out[toggle] = {"skipped": "section time cap reached"}
            continue
        if device.type != "cuda" and toggle not in ("off", "bf16"):
            out[toggle] = {"skipped": "CUDA only"}
            continue
        old = torch.backends.cudnn.benchmark
        try:
            set_backends(device, benchmark=toggle == "cudnn_benchmark")
            fn = make(toggle)
            loss = float(fn())
            res = timed(fn, items, device, prof.warmup, prof.repeats, clock)
            res["loss"] = loss
            if toggle == "off":
                base = res
            elif base is not None:
                err = abs(loss - base["loss"]) / max(abs(base["loss"]), 1e-12)
                res.update(rel_loss_err=err, tolerance=SPEED_TOGGLES[toggle], parity_ok=err <= SPEED_TOGGLES[toggle],
                           speedup=res["images_per_s"] / base["images_per_s"])
        except Exception as e:  # noqa: BLE001 - record and go on with the next toggle
            res = {"error": error_text(e)}
        finally:
            torch.backends.cudnn.benchmark = old
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out[toggle] = res
    return out


def _stage1_batch(batch: int, crop: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, crop, crop, generator=g)
    img2 = torch.randn(batch, 3, crop, crop, generator=g)
    y = torch.zeros(batch, 20)
    y[:, 14] = 1  # a class both images share, as the pair dataset guarantees
    y[::2, 8] = 1
    y2 = y.roll(1, 0).clone()
    y2[:, 14] = 1
    return tuple(t.to(device) for t in (img, img2, y, y2))


def section_stage1_train(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from models.ktse import KTSEConfig, KTSEStep, build_optimizer
    from models.resnet38d import Net_gpp

    torch.manual_seed(0)
    net = Net_gpp(width=prof.net_width)
    opt = build_optimizer(net, 0.01, 5e-4, 10 ** 6)
    net.to(device).train()
    step = KTSEStep(net, cfg=KTSEConfig(ktse_start_epoch=10)).to(device)

    def run_one(batch: int, phase: str, amp: bool, clock: Clock) -> dict:
        ctx, scaler = amp_setup(device, amp)
        epo = 0 if phase == "cls" else 10

        def attempt(b: int) -> dict:
            img, img2, y, y2 = _stage1_batch(b, prof.crop, device)

            def fn() -> None:
                opt.zero_grad(set_to_none=True)
                with ctx():
                    res = step(img, img2, y, y2, epo)
                backward_step(res["loss"], opt, scaler)

            return timed(fn, b, device, prof.warmup, prof.repeats, clock)

        return halving_batch(batch, attempt, opt)

    configs = [(f"batch{b}_{phase}", {"batch": b, "phase": phase}) for b in prof.batches for phase in ("cls", "ktse")]
    out["setting"] = (f"Net_gpp width {prof.net_width}, crop {prof.crop}, phase cls = epoch < T (classification), "
                      "ktse = epoch >= T (4 forwards + PAR + all losses); images = samples (image pairs)")
    _precision_runs(device, prof, clock, out, configs, run_one)
    del net, opt, step

    def make(toggle: str) -> Callable[[], torch.Tensor]:
        seed_everything(0)
        net = Net_gpp(width=prof.net_width)
        opt = build_optimizer(net, 0.01, 5e-4, 10 ** 6)
        net.to(device).train()
        cl = toggle == "channels_last"
        step = prepare_module(KTSEStep(net, cfg=KTSEConfig(ktse_start_epoch=10)).to(device), device,
                              channels_last=cl, compile=toggle == "compile")
        ctx, scaler = amp_setup(device, toggle == "bf16", "bf16")
        img, img2, y, y2 = _stage1_batch(prof.batches[0], prof.crop, device)
        img, img2 = to_device(img, device, cl), to_device(img2, device, cl)

        def fn() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with ctx():
                res = step(img, img2, y, y2, 10)
            backward_step(res["loss"], opt, scaler)
            return res["loss"].detach()

        return fn

    out["speed"] = speed_toggles(device, prof, clock, prof.batches[0], make)


def _voc_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(2, hw[0] // 16), max(2, hw[1] // 16), 3)).astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(low).resize((hw[1], hw[0]), Image.BILINEAR))


def section_cam_infer(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from models.cam import msf_cam
    from models.resnet38d import Net_gpp
    from voc12.data import msf_inputs

    torch.manual_seed(0)
    net = Net_gpp(width=prof.net_width).to(device).eval()
    img = _voc_image(prof.image_hw)
    inputs = msf_inputs(img, prof.cam_scales)
    label = np.zeros(20, np.float32)
    label[[3, 14]] = 1

    def run_one(amp: bool, clock: Clock) -> dict:
        return timed(lambda: msf_cam(net, inputs, label, img.shape[:2], amp=amp), 1, device, prof.warmup,
                     prof.repeats, clock)

    out["setting"] = (f"Net_gpp width {prof.net_width}, one {prof.image_hw[1]}x{prof.image_hw[0]} image, "
                      f"scales {list(prof.cam_scales)} x flip, 2 classes")
    _precision_runs(device, prof, clock, out, [("msf_cam", {})], run_one)


def section_irn_label(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from irn.net.resnet50_irn import EdgeDisplacement
    from irn.random_walk import propagate_to_edge, sem_seg_from_rw, walk_bytes
    from irn.steps.make_cam import cams_from_outputs, flip_merged_cam
    from models.resnet38d import Net_gpp
    from voc12.data import msf_inputs

    torch.manual_seed(0)
    cam_net = Net_gpp(width=prof.net_width).to(device).eval()
    edge_net = EdgeDisplacement(crop_size=prof.irn_crop, stride=4, backbone_width=prof.irn_width).to(device).eval()
    img = _voc_image(prof.image_hw)
    scales = (1.0, 0.5, 1.5, 2.0)  # IRN make_cam's default --cam_scales
    arrays = msf_inputs(img, scales)
    label = np.zeros(20, np.float32)
    label[[3, 14]] = 1
    pair = torch.from_numpy(np.stack(arrays[:2])).to(device)  # scale 1.0 and its flip (EdgeDisplacement's input)
    keys = np.array([0, 4, 15])

    def make_cam(amp: bool):
        with torch.no_grad(), autocast(device, amp):
            outputs = [flip_merged_cam(cam_net, torch.from_numpy(np.stack(arrays[i:i + 2])).to(device)).float()
                       for i in range(0, len(arrays), 2)]
        return cams_from_outputs(outputs, img.shape[:2], label)

    def edge(amp: bool) -> torch.Tensor:
        with torch.no_grad(), autocast(device, amp):
            e, _ = edge_net(pair)
        return e.float()

    def run_one(part: str, amp: bool, clock: Clock) -> dict:
        if part == "make_cam":
            return timed(lambda: make_cam(amp), 1, device, prof.warmup, prof.repeats, clock)
        if part == "edge":
            return timed(lambda: edge(amp), 1, device, prof.warmup, prof.repeats, clock)
        # the walk is float32 (sparse: float64) arithmetic, outside autocast: one fp32 row
        _, cam, _ = make_cam(False)
        cams = torch.from_numpy(cam).to(device)
        e = edge(False)
        mode = part.split("_", 1)[1]

        def fn() -> None:
            rw = propagate_to_edge(cams, e, radius=5, beta=10, exp_times=8, mode=mode)
            sem_seg_from_rw(rw, keys, img.shape[:2], 0.25)

        res = timed(fn, 1, device, 0 if mode == "sparse" else prof.warmup, prof.repeats, clock)
        res["walk_bytes_estimate"] = walk_bytes(cams.shape[1], cams.shape[2], cams.shape[0], mode)
        res["grid_hw"] = [int(cams.shape[1]), int(cams.shape[2])]
        return res

    out["setting"] = (f"one {prof.image_hw[1]}x{prof.image_hw[0]} image, 2 classes: make_cam (Net_gpp width "
                      f"{prof.net_width}, scales {list(scales)} x flip), IRN boundary map (ResNet-50 width "
                      f"{prof.irn_width}), random walk beta 10, exp_times 8 (float32 dense/chunked on the device, "
                      "float64 sparse on the CPU; AMP applies to the networks only)")
    configs = [(p, {"part": p}) for p in ("make_cam", "edge")] + \
        [(p, {"part": p, "precisions": ("fp32",)}) for p in ("walk_dense", "walk_chunked", "walk_sparse")]
    _precision_runs(device, prof, clock, out, configs, run_one)


def _irn_train_model(prof: Profile, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """IRN's training module (radius-10 paths on the (crop/4)² grid) in train mode, and the trainer's
    optimizer: two groups (x1, x10), the reference's weight-decay-as-momentum quirk."""
    from irn.net.resnet50_irn import AffinityDisplacementLoss
    from irn.path_index import PathIndex

    g = prof.irn_crop // 4
    torch.manual_seed(0)
    model = AffinityDisplacementLoss(PathIndex(radius=10, default_size=(g, g)), backbone_width=prof.irn_width)
    model.to(device)
    edge_p, dp_p = model.trainable_parameters()
    opt = poly_sgd([{"params": edge_p, "lr": 0.1}, {"params": dp_p, "lr": 1.0}], lr=0.1, weight_decay=1e-4,
                   momentum=0.9, momentum_quirk=True)
    return model.train(), opt


def section_irn_train(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from irn.steps.train_irn import irn_total_loss

    model, opt = _irn_train_model(prof, device)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(prof.irn_batch, 3, prof.irn_crop, prof.irn_crop, generator=gen).to(device)
    with torch.no_grad():
        shape = model(img[:1], True)[0].shape[1:]
    labels = [(torch.rand((prof.irn_batch,) + tuple(shape), generator=gen) < p).float().to(device)
              for p in (0.3, 0.3, 0.2)]

    def run_one(amp: bool, clock: Clock) -> dict:
        ctx, scaler = amp_setup(device, amp)

        def fn() -> None:
            opt.zero_grad()
            with ctx():
                parts = irn_total_loss(*model(img, True), *labels)
            backward_step(parts["loss_total"], opt, scaler)

        return timed(fn, prof.irn_batch, device, prof.warmup, prof.repeats, clock)

    out["setting"] = (f"AffinityDisplacementLoss (ResNet-50 width {prof.irn_width}), batch {prof.irn_batch}, "
                      f"crop {prof.irn_crop}, radius 10 (the trainer itself runs fp32)")
    _precision_runs(device, prof, clock, out, [("step", {})], run_one)


def _beco_model(prof: Profile, device: torch.device, warm_up: int):
    from segmentation.beco.deeplabv2 import build_deeplabv2
    from segmentation.beco.model import BECO, BECOSettings

    torch.manual_seed(0)
    nets = [build_deeplabv2(backbone=prof.beco_backbone, width=prof.beco_width) for _ in range(2)]
    model = BECO(nets[0], nets[1], BECOSettings(warm_up=warm_up)).to(device)
    model.epoch = warm_up  # after the warm-up: the online labels' extra forward of both nets is on
    return model


def _beco_batch(prof: Profile, device: torch.device, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    b = batch or prof.beco_batch
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, 3, prof.beco_crop, prof.beco_crop, generator=g)
    lab = torch.randint(0, 21, (b, prof.beco_crop, prof.beco_crop), generator=g)
    msk = torch.randint(0, 2, (b, prof.beco_crop, prof.beco_crop), generator=g)
    return img.to(device), lab.to(device), msk.to(device)


def beco_schedule() -> dict[str, Any]:
    cfg = json.loads(BECO_CONFIG.read_text(encoding="utf-8"))
    return {"max_epoch": int(cfg["runner"]["max_epoch"]), "batch_size": int(cfg["loader"]["batch_size"]),
            "crop_size": int(cfg["data"]["crop_size"]), "val_size": int(cfg["data"]["val_size"]),
            "warm_up": int(cfg["model"]["warm_up"]), "msc_scales": cfg["model"]["msc_scales"]}


def section_beco_train(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from segmentation.beco.engine import build_optimizer, train_step

    model = _beco_model(prof, device, beco_schedule()["warm_up"])
    opt = build_optimizer(model, 0.01, 0.9, 1e-4)

    def run_one(amp: bool, clock: Clock) -> dict:
        ctx, scaler = amp_setup(device, amp)

        def attempt(b: int) -> dict:
            img, lab, msk = _beco_batch(prof, device, b)
            return timed(lambda: train_step(model, opt, img, lab, msk, ctx, scaler), b, device,
                         prof.warmup, prof.repeats, clock)

        return halving_batch(prof.beco_batch, attempt, opt)

    out["setting"] = (f"two DeepLabV2 {prof.beco_backbone} width {prof.beco_width}, OS 8, batch {prof.beco_batch} "
                      f"per GPU, crop {prof.beco_crop}, after the warm-up (online labels on), class mix + strong "
                      "augmentation")
    _precision_runs(device, prof, clock, out, [("step", {})], run_one)
    del model, opt

    def make(toggle: str) -> Callable[[], torch.Tensor]:
        model = _beco_model(prof, device, beco_schedule()["warm_up"])
        seed_everything(0)  # class mix and augmentation draw from these; the first step must match
        cl = toggle == "channels_last"
        for k in ("network1", "network2"):
            prepare_module(getattr(model, k), device, channels_last=cl, compile=toggle == "compile")
        opt = build_optimizer(model, 0.01, 0.9, 1e-4)
        ctx, scaler = amp_setup(device, toggle == "bf16", "bf16")
        img, lab, msk = _beco_batch(prof, device)
        img = to_device(img, device, cl)

        def fn() -> torch.Tensor:
            model.reseed_aug(0)  # the same strong augmentation every call, so the first losses compare
            return train_step(model, opt, img, lab, msk, ctx, scaler)["loss"].detach()

        return fn

    out["speed"] = speed_toggles(device, prof, clock, prof.beco_batch, make)


def section_beco_test(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    model = _beco_model(prof, device, 0).eval()
    x = torch.randn(1, 3, prof.beco_test, prof.beco_test, generator=torch.Generator().manual_seed(0)).to(device)

    def run_one(amp: bool, clock: Clock) -> dict:
        def fn() -> None:
            with autocast(device, amp):
                model.test_forward(x)

        return timed(fn, 1, device, prof.warmup, prof.repeats, clock)

    out["setting"] = (f"two DeepLabV2 {prof.beco_backbone} width {prof.beco_width}, one {prof.beco_test}x"
                      f"{prof.beco_test} image, scales {beco_schedule()['msc_scales']} (the test itself runs fp32 "
                      "unless --amp_eval)")
    _precision_runs(device, prof, clock, out, [("msc_test", {})], run_one)


# ---------------------------------------------------------------------------------------------- DDP
def ddp_worker(local_rank: int, device_name: str, profile: str, out_path: str) -> None:
    """One torchrun-style process (spawned by tools.runtime.spawn_per_gpu with its environment): the
    runtime's device and backend, a one-process group, and one DDP step of each trainer. Writes
    ``{trainer: {"ok": bool, "seconds"|"error"}, "backend": ...}`` to ``out_path``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from models.ktse import KTSEConfig, KTSEStep, build_optimizer as stage1_optimizer
    from models.resnet38d import Net_gpp
    from segmentation.beco.engine import build_optimizer as beco_optimizer, train_step, wrap_ddp
    from tools.runtime import setup_runtime

    prof = QUICK if profile == "quick" else FULL
    args = SimpleNamespace(device=device_name)
    rt = setup_runtime(args)
    device = rt.device
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    res: dict[str, Any] = {"backend": args.dist_backend, "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    # one process is not 'distributed' for the runtime (no group); a DDP wrapper needs one, as with N GPUs
    if not dist.is_initialized():
        dist.init_process_group(backend=args.dist_backend or "gloo", init_method="env://", world_size=1, rank=0)
    ids = [device.index] if device.type == "cuda" else None

    def stage1() -> None:
        net = Net_gpp(width=prof.net_width)
        opt = stage1_optimizer(net, 0.01, 5e-4, 100)
        net.to(device).train()
        model = DDP(KTSEStep(net, cfg=KTSEConfig(ktse_start_epoch=0)).to(device), device_ids=ids,
                    broadcast_buffers=False)
        img, img2, y, y2 = _stage1_batch(prof.batches[0], prof.crop, device)
        opt.zero_grad(set_to_none=True)
        backward_step(model(img, img2, y, y2, 0)["loss"], opt)

    def irn() -> None:
        from irn.steps.train_irn import irn_total_loss

        m, opt = _irn_train_model(prof, device)
        model = DDP(m, device_ids=ids)
        img = torch.randn(2, 3, prof.irn_crop, prof.irn_crop, device=device)
        outs = model(img, True)
        labels = [torch.ones_like(outs[0]) for _ in range(3)]
        opt.zero_grad()
        backward_step(irn_total_loss(*outs, *labels)["loss_total"], opt)

    def beco() -> None:
        model = wrap_ddp(_beco_model(prof, device, 2), device)
        opt = beco_optimizer(model, 0.01, 0.9, 1e-4)
        img, lab, msk = _beco_batch(prof, device, batch=2)
        train_step(model, opt, img, lab, msk)

    for name, fn in (("stage1", stage1), ("irn", irn), ("beco", beco)):
        t0 = time.perf_counter()
        try:
            fn()
            sync(device)
            res[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as e:  # noqa: BLE001 - record, try the next trainer
            res[name] = {"ok": False, "error": error_text(e)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(res), encoding="utf-8")


def section_ddp(device: torch.device, prof: Profile, clock: Clock, out: dict) -> None:
    from tools.runtime import spawn_per_gpu

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ddp.json"
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
        t0 = time.perf_counter()
        try:
            spawn_per_gpu(ddp_worker, 1, (str(device), prof.name, str(path)), torchrun_env=True)
        finally:
            for k, v in saved.items():  # spawn_per_gpu sets the rendezvous address in this process
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out.update(json.loads(path.read_text(encoding="utf-8")))
        out["wall_s_incl_process_start"] = round(time.perf_counter() - t0, 2)


SECTION_FNS: dict[str, Callable[[torch.device, Profile, Clock, dict], None]] = {
    "parity": section_parity, "stage1_train": section_stage1_train, "cam_infer": section_cam_infer,
    "irn_label": section_irn_label, "irn_train": section_irn_train, "beco_train": section_beco_train,
    "beco_test": section_beco_test, "ddp": section_ddp}


# ---------------------------------------------------------------------------------------------- estimate
def _rate(sections: dict, section: str, config: str, prec: str) -> float | None:
    r = sections.get(section, {}).get(config, {}).get(prec, {})
    return r.get("images_per_s") if isinstance(r, dict) else None


def pipeline_estimate(sections: dict, prof: Profile) -> dict[str, Any]:
    """GPU-hours of the full VOC pipeline per precision, from the measured rates and the reference schedules:
    stage one 40 epochs of train_aug (epochs 0-9 at batch 8, classification only; 10-39 at batch 16 with the
    KTSE terms), CAMs of train_aug, IRN make_cam + boundary map + dense walk of train_aug, IRN 3 epochs at
    batch 32, BECO's epochs at its per-GPU batch (segmentation/configs) plus its MSC test of val.
    None where a rate is missing (a failed or skipped row)."""
    b = beco_schedule()
    small, large = prof.batches[0], prof.batches[-1]
    est: dict[str, Any] = {"assumptions": {
        "stage1": f"10 epochs x {VOC_TRAIN_AUG} at batch {small} (phase cls) + 30 epochs at batch {large} (phase ktse)",
        "cam_infer": f"{VOC_TRAIN_AUG} images", "irn_label": f"{VOC_TRAIN_AUG} images: make_cam + edge + dense walk",
        "irn_train": f"3 epochs x {VOC_TRAIN_AUG // 32 * 32} images",
        "beco": f"{b['max_epoch']} epochs x {VOC_TRAIN_AUG // b['batch_size'] * b['batch_size']} images at batch "
                f"{b['batch_size']} per GPU + MSC test of {VOC_VAL} val images",
        "widths": f"profile {prof.name} (only the full profile's numbers mean anything)"}}
    for prec in PRECISIONS:
        def secs(n: float, rate: float | None) -> float | None:
            return n / rate if rate else None

        walk = [_rate(sections, "irn_label", p, prec) for p in ("make_cam", "edge")] + \
            [_rate(sections, "irn_label", "walk_dense", "fp32")]
        per_img = sum(1 / r for r in walk) if all(walk) else None
        parts = {
            "stage1_train": (lambda a, c: a + c if a is not None and c is not None else None)(
                secs(10 * VOC_TRAIN_AUG, _rate(sections, "stage1_train", f"batch{small}_cls", prec)),
                secs(30 * VOC_TRAIN_AUG, _rate(sections, "stage1_train", f"batch{large}_ktse", prec))),
            "cam_infer": secs(VOC_TRAIN_AUG, _rate(sections, "cam_infer", "msf_cam", prec)),
            "irn_label": VOC_TRAIN_AUG * per_img if per_img else None,
            "irn_train": secs(3 * (VOC_TRAIN_AUG // 32 * 32), _rate(sections, "irn_train", "step", prec)),
            "beco_train": secs(b["max_epoch"] * (VOC_TRAIN_AUG // b["batch_size"] * b["batch_size"]),
                               _rate(sections, "beco_train", "step", prec)),
            "beco_test": secs(VOC_VAL, _rate(sections, "beco_test", "msc_test", prec)),
        }
        hours = {k: (round(v / 3600, 3) if v is not None else None) for k, v in parts.items()}
        known = [v for v in hours.values() if v is not None]
        hours["total"] = round(sum(known), 3) if len(known) == len(parts) else None
        est[prec] = hours
    return est


# ---------------------------------------------------------------------------------------------- report
def table_rows(sections: dict) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for sec in SECTIONS[1:-1]:
        for config, by_prec in sections.get(sec, {}).items():
            if not isinstance(by_prec, dict) or config in ("status", "error", "seconds", "speed"):
                continue
            for prec, r in by_prec.items():
                if not isinstance(r, dict):
                    continue
                if "images_per_s" in r:
                    mem = f"{r['peak_mem_bytes'] / 2 ** 20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
                    rows.append((sec, config, prec, f"{r['images_per_s']:.3f}", mem, f"{r['spread']:.2f}"))
                else:
                    rows.append((sec, config, prec, "-", "-", (r.get("error") or r.get("skipped") or "")[:60]))
    return rows


def print_report(result: dict) -> None:
    print(f"gpu_check ({result['profile']}) on {result['device_name']}: {meta_line(result['machine_meta'])}")
    par = result["sections"].get("parity", {})
    for name, r in par.items():
        if isinstance(r, dict) and "pass" in r:
            worst = max(r.get("max_rel", {}).values(), default=float("nan"))
            print(f"  parity {name:<16} {'PASS' if r['pass'] else 'FAIL'}  max rel {worst:.2e} "
                  f"(tol {r.get('tolerance', '-')}) {r.get('error', '')}")
    print(f"{'section':<13} {'config':<15} {'prec':<5} {'images/s':>10} {'peak MiB':>9}  spread / note")
    for row in table_rows(result["sections"]):
        print(f"{row[0]:<13} {row[1]:<15} {row[2]:<5} {row[3]:>10} {row[4]:>9}  {row[5]}")
    for sec in ("stage1_train", "beco_train"):
        for toggle, r in result["sections"].get(sec, {}).get("speed", {}).items():
            note = (f"x{r['speedup']:.2f}, loss rel err {r['rel_loss_err']:.1e} "
                    f"{'ok' if r['parity_ok'] else 'OVER ' + str(r['tolerance'])}" if "speedup" in r
                    else r.get("error") or r.get("skipped") or f"{r.get('images_per_s', 0):.3f} images/s")
            print(f"  speed {sec:<12} {toggle:<15} {note}")
    ddp = result["sections"].get("ddp", {})
    for t in ("stage1", "irn", "beco"):
        if t in ddp:
            print(f"  ddp {t:<7} ({ddp.get('backend')}) {'ok' if ddp[t].get('ok') else ddp[t].get('error')}")
    est = result["estimate_gpu_hours"]
    print("VOC pipeline estimate, GPU-hours on this device:")
    for prec in PRECISIONS:
        print(f"  {prec:<5} " + ", ".join(f"{k} {v if v is not None else '?'}" for k, v in est[prec].items()))
    for sec, st in result["section_status"].items():
        if st["status"] != "ok":
            print(f"  section {sec}: {st['status']} {st.get('error', '')}")
    print(f"wrote {result['out']}")


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def run(a: argparse.Namespace) -> dict[str, Any]:
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"gpu_check: --device {a.device} but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); run it where a GPU is, or use --device cpu --quick")
    device = select_device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if a.threads:
        torch.set_num_threads(a.threads)
    prof = QUICK if a.quick else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out_path = Path(a.out) if a.out else ROOT / "bench" / "results" / \
        f"gpu_{device_slug(name)}{'_quick' if a.quick else ''}.json"
    wanted = [s for s in SECTIONS if s in a.sections]
    total = sum(SECTION_SHARE[s] for s in wanted)
    result: dict[str, Any] = {
        "benchmark": "gpu_check", "profile": prof.name, "profile_settings": asdict(prof), "device": str(device),
        "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "amp_dtype": str(amp_dtype(device)).replace("torch.", ""),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "budget_s": a.budget_s, "args": vars(a),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine_meta": machine_meta(),
        "sections": {}, "section_status": {}, "out": str(out_path)}
    t_all = time.perf_counter()

    def write() -> None:  # after every section, so a run killed by a timeout still leaves its figures
        result["wall_s"] = round(time.perf_counter() - t_all, 2)
        result["machine_meta_end"] = machine_meta()
        result["estimate_gpu_hours"] = pipeline_estimate(result["sections"], prof)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, result)

    try:
        for sec in wanted:
            clock = Clock(a.budget_s * SECTION_SHARE[sec] / total)
            out: dict = result["sections"].setdefault(sec, {})
            status: dict[str, Any] = {"status": "ok"}
            try:
                SECTION_FNS[sec](device, prof, clock, out)
            except SectionBudgetSpent as e:
                status = {"status": "partial", "error": str(e)}
            except Exception as e:  # noqa: BLE001 - a failing section must not stop the others
                status = {"status": "failed", "error": error_text(e)}
            status["seconds"] = round(time.perf_counter() - clock.t0, 2)
            result["section_status"][sec] = status
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
    finally:
        write()
    print_report(result)
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="toy widths and tiny inputs (the CPU test mode)")
    ap.add_argument("--budget_s", type=float, default=450.0,
                    help="time cap of all sections together, shared out per section (default 450)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="sections to run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_<device name>.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
