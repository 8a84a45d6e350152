"""BECO stage speed on this machine: DeepLabV2 forward (reference ResNet-101, OS 8), the two-net
multi-scale test of one 512x512 image, one BECO training iteration of the toy preset (ResNet-18 width 16,
batch 8, crop 96, both nets + online labels + strong augmentation) at 1 and 2 threads, and test.py's
per-image CRF at VOC size. Prints a table and writes ``bench/results/beco_speed.json``.

    python bench/beco_speed.py [--repeats 3] [--skip_r101]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segmentation.beco.deeplabv2 import build_deeplabv2  # noqa: E402
from segmentation.beco.model import BECO, BECOSettings  # noqa: E402
from segmentation.beco.engine import build_optimizer, train_step  # noqa: E402
from bench._meta import machine_meta  # noqa: E402
from tools.io import atomic_write_json  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_r101", action="store_true", help="skip the reference-size network rows")
    a = ap.parse_args(argv)
    rows: list[tuple[str, str, float]] = []
    torch.manual_seed(0)

    if not a.skip_r101:
        torch.set_num_threads(2)
        net = build_deeplabv2().eval()
        x = torch.randn(1, 3, 321, 321)
        with torch.no_grad():
            rows.append(("DeepLabV2-R101 forward", "1x3x321x321, eval, 2 threads",
                         _time(lambda: net(x), a.repeats)))
            model = BECO(net, build_deeplabv2().eval(), BECOSettings(mix_aug=False)).eval()
            x512 = torch.randn(1, 3, 512, 512)
            rows.append(("BECO two-net MSC test", "1x3x512x512, scales 0.75/1/1.25, 2 threads",
                         _time(lambda: model.test_forward(x512), 1)))
        del net, model

    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        nets = [build_deeplabv2(backbone="resnet18", width=16) for _ in range(2)]
        model = BECO(nets[0], nets[1], BECOSettings(warm_up=0))
        opt = build_optimizer(model, 0.05, 0.9, 1e-4)
        img = torch.randn(8, 3, 96, 96)
        lab = torch.randint(0, 21, (8, 96, 96))
        msk = torch.randint(0, 2, (8, 96, 96))
        rows.append(("BECO train iteration (toy preset)", f"R18 w16, 8x96x96, after warm-up, {threads} thread(s)",
                     _time(lambda: train_step(model, opt, img, lab, msk), a.repeats)))

    try:
        from segmentation.beco.postprocess import predict_one
        from tools.crf import crf_available

        if crf_available():
            rng = np.random.default_rng(0)
            im = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            lg = rng.standard_normal((21, 64, 64)).astype(np.float32)
            rows.append(("test.py per image, CRF", "375x500, 21 classes, 10 iterations, 1 process",
                         _time(lambda: predict_one(lg, im, True), a.repeats)))
            rows.append(("test.py per image, no CRF", "375x500, 21 classes, 1 process",
                         _time(lambda: predict_one(lg, im, False), a.repeats)))
    except ImportError:
        pass

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'seconds':>8}  setting")
    for name, setting, sec in rows:
        print(f"{name:<{w}}  {sec:8.3f}  {setting}")
    print(f"(median of {a.repeats}; 1-min load average {load:.1f} on {os.cpu_count()} cores)")
    atomic_write_json(ROOT / "bench" / "results" / "beco_speed.json", {
        "rows": [{"what": n, "setting": s, "seconds": round(t, 4)} for n, s, t in rows],
        "repeats": a.repeats, "load_average_1min": load, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor(),
        "machine_meta": machine_meta(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
