"""BECO stage speed on this machine: DeepLabV2 forward (reference ResNet-101, OS 8), the two-net
multi-scale test of one 512x512 image, one BECO training iteration of the toy preset (ResNet-18 width 16,
batch 8, crop 96, both nets + online labels + strong augmentation) at 1 and 2 threads, and test.py's
per-image CRF at VOC size. Prints a table and writes ``bench/results/beco_speed.json`` (``--out``).

Every time is a ``bench._meta.stable_time`` record after one warm-up call. Baselines timed in the same run
stand next to the absolute times: ``ratio_msc_test_over_single_forward`` (the two-net MSC test of a
512x512 image over one single-scale forward of one of its networks at 512x512) and
``ratio_crf_over_no_crf`` (test.py's per-image work with and without the CRF).

    python bench/beco_speed.py [--max_repeats 10] [--skip_r101] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segmentation.beco.deeplabv2 import build_deeplabv2  # noqa: E402
from segmentation.beco.model import BECO, BECOSettings  # noqa: E402
from segmentation.beco.engine import build_optimizer, train_step  # noqa: E402
from bench._meta import TIMING_HEADER, machine_meta, stable_time, timing_cells  # noqa: E402
from tools.io import atomic_write_json  # noqa: E402


def _time(fn, a: argparse.Namespace, max_repeats: int | None = None) -> dict:
    """One warm-up call, then :func:`bench._meta.stable_time` under the run's flags."""
    fn()
    return stable_time(fn, min_repeats=a.min_repeats, max_repeats=max_repeats or a.max_repeats,
                       rel_spread=a.rel_spread, max_seconds=a.max_seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min_repeats", type=int, default=3, help="stable_time window (last N times)")
    ap.add_argument("--max_repeats", type=int, default=10, help="stable_time cap on timed calls")
    ap.add_argument("--max_seconds", type=float, default=None, help="stable_time cap on timed seconds per row")
    ap.add_argument("--rel_spread", type=float, default=0.05, help="stable when (max-min)/median <= this")
    ap.add_argument("--skip_r101", action="store_true", help="skip the reference-size network rows")
    ap.add_argument("--fwd_size", type=int, default=321, help="input side of the R101 forward row")
    ap.add_argument("--msc_size", type=int, default=512, help="input side of the MSC test and its baseline")
    ap.add_argument("--toy_batch", type=int, default=8, help="batch of the toy training iteration")
    ap.add_argument("--toy_crop", type=int, default=96, help="crop of the toy training iteration")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "beco_speed.json"))
    a = ap.parse_args(argv)
    rows: list[tuple[str, str, dict]] = []
    ratios: dict[str, float] = {}
    torch.manual_seed(0)

    if not a.skip_r101:
        torch.set_num_threads(2)
        net = build_deeplabv2().eval()
        f, m = a.fwd_size, a.msc_size
        x = torch.randn(1, 3, f, f)
        with torch.no_grad():
            rows.append(("DeepLabV2-R101 forward", f"1x3x{f}x{f}, eval, 2 threads", _time(lambda: net(x), a)))
            model = BECO(net, build_deeplabv2().eval(), BECOSettings(mix_aug=False)).eval()
            x512 = torch.randn(1, 3, m, m)
            single = _time(lambda: net(x512), a)
            rows.append(("DeepLabV2-R101 forward (MSC baseline)", f"1x3x{m}x{m}, one net, one scale, 2 threads",
                         single))
            msc = _time(lambda: model.test_forward(x512), a)
            rows.append(("BECO two-net MSC test", f"1x3x{m}x{m}, scales 0.75/1/1.25, 2 threads", msc))
            ratios["ratio_msc_test_over_single_forward"] = msc["median_s"] / single["median_s"]
        del net, model

    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        nets = [build_deeplabv2(backbone="resnet18", width=16) for _ in range(2)]
        model = BECO(nets[0], nets[1], BECOSettings(warm_up=0))
        opt = build_optimizer(model, 0.05, 0.9, 1e-4)
        b, c = a.toy_batch, a.toy_crop
        img = torch.randn(b, 3, c, c)
        lab = torch.randint(0, 21, (b, c, c))
        msk = torch.randint(0, 2, (b, c, c))
        rows.append(("BECO train iteration (toy preset)", f"R18 w16, {b}x{c}x{c}, after warm-up, {threads} thread(s)",
                     _time(lambda: train_step(model, opt, img, lab, msk), a)))

    try:
        from segmentation.beco.postprocess import predict_one
        from tools.crf import crf_available

        if crf_available():
            rng = np.random.default_rng(0)
            im = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            lg = rng.standard_normal((21, 64, 64)).astype(np.float32)
            with_crf = _time(lambda: predict_one(lg, im, True), a)
            no_crf = _time(lambda: predict_one(lg, im, False), a)
            rows.append(("test.py per image, CRF", "375x500, 21 classes, 10 iterations, 1 process", with_crf))
            rows.append(("test.py per image, no CRF", "375x500, 21 classes, 1 process", no_crf))
            ratios["ratio_crf_over_no_crf"] = with_crf["median_s"] / no_crf["median_s"]
    except ImportError:
        pass

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {TIMING_HEADER}  setting")
    for name, setting, t in rows:
        print(f"{name:<{w}}  {timing_cells(t)}  {setting}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"(1-min load average {load:.1f} on {os.cpu_count()} cores)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, {
        "rows": [{"what": n, "setting": s, "seconds": round(t["median_s"], 4), "timing": t} for n, s, t in rows],
        **ratios, "min_repeats": a.min_repeats, "max_repeats": a.max_repeats, "rel_spread": a.rel_spread,
        "load_average_1min": load, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor(),
        "machine_meta": machine_meta(),
    })
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
