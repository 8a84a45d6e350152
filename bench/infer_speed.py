"""infer.py speed: images/s of the multi-scale + flip CAM inference at VOC size.

Builds a tiny VOC-format tree of synthetic 500x375 / 375x500 JPEGs (2 classes each) and a checkpoint of
a randomly initialised ``Net_gpp`` (reference width by default: speed does not depend on the weights),
runs the ``infer.py --dict`` work (:func:`models.cam_infer.run`) and reports images/s; then, on one image,
the batched MSF forward (a scale and its flip as one batch) against the one-input-at-a-time loop.

    python bench/infer_speed.py [--n 2] [--width 1.0] [--device cpu] [--threads N]

Writes ``bench/results/infer_speed.json`` (``--out``); with ``--device cuda`` the file name gets a
``_cuda`` suffix.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.cam import msf_cam  # noqa: E402
from models.cam_infer import InferSettings, run  # noqa: E402
from models.resnet38d import Net_gpp  # noqa: E402
from bench._meta import machine_meta  # noqa: E402
from tools.io import atomic_torch_save, atomic_write_json  # noqa: E402
from voc12.data import msf_inputs  # noqa: E402


def make_tree(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    jpg = root / "VOC2012" / "JPEGImages"
    jpg.mkdir(parents=True, exist_ok=True)
    ids, labels = [], {}
    for i in range(n):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        # smooth colour field + noise: compresses and decodes like a photo, not like white noise
        base = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        img_id = f"2098_{i:06d}"
        Image.fromarray(img).save(jpg / f"{img_id}.jpg", quality=90)
        lab = np.zeros(20, np.float32)
        lab[rng.choice(20, 2, replace=False)] = 1
        ids.append(img_id)
        labels[img_id] = lab
    (root / "list.txt").write_text("".join(f"/JPEGImages/{i}.jpg\n" for i in ids))
    np.save(root / "cls_labels.npy", labels)
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2, help="images (each = 8 forwards, up to 1000x750)")
    ap.add_argument("--width", type=float, default=1.0, help="Net_gpp width (1.0 = reference)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--compare_width", type=float, default=0.25,
                    help="width of the batched-vs-loop comparison on one image (0 = skip)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        "infer_speed.json" if a.device == "cpu" else f"infer_speed_{a.device.split(':')[0]}.json")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = make_tree(tmp, a.n)
        torch.manual_seed(0)
        net = Net_gpp(width=a.width)
        atomic_torch_save(net.state_dict(), tmp / "ckpt.pth")
        del net
        args = InferSettings(name="bench", load_epo=0, dict=True, infer_list=str(tmp / "list.txt"),
                             data_root=str(tmp / "VOC2012"), cls_labels=str(tmp / "cls_labels.npy"),
                             ckpt=str(tmp / "ckpt.pth"), exp_root=str(tmp / "exp"), device=a.device,
                             workers=a.workers, no_progress=True, threads=a.threads or None)
        t0 = time.perf_counter()
        stats = run(args)
        wall = time.perf_counter() - t0
        assert stats["inferred"] == a.n and len(list((tmp / "exp" / "bench" / "dict").glob("*.npy"))) == a.n

        compare = {}
        if a.compare_width > 0:
            dev = torch.device(a.device)
            torch.manual_seed(0)
            small = Net_gpp(width=a.compare_width).eval().to(dev)
            img = np.asarray(Image.open(tmp / "VOC2012" / "JPEGImages" / f"{ids[0]}.jpg").convert("RGB"))
            inputs = msf_inputs(img)
            label = np.eye(20, dtype=np.float32)[3] + np.eye(20, dtype=np.float32)[14]
            msf_cam(small, inputs, label, img.shape[:2])  # warm-up
            for mode in (True, False):
                ts = []
                for _ in range(2):
                    t = time.perf_counter()
                    msf_cam(small, inputs, label, img.shape[:2], batch_same_shape=mode)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
                compare["batched_s" if mode else "loop_s"] = min(ts)
            compare["width"] = a.compare_width

    rate = stats["inferred"] / stats["seconds"]
    result = {
        "device": a.device, "width": a.width, "images": a.n, "image_size": "500x375 / 375x500",
        "scales": [0.5, 1.0, 1.5, 2.0], "flips": True, "threads": torch.get_num_threads(),
        "loader_workers": a.workers, "images_per_s": rate, "s_per_image": 1 / rate,
        "wall_incl_model_load_s": wall, "batched_vs_loop_one_image": compare,
        "machine": f"{platform.node()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine_meta": machine_meta(),
    }
    if a.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"{'measure':40s} {'value':>10s}")
    print(f"{'infer.py images/s (width %g, %s)' % (a.width, a.device):40s} {rate:10.4f}")
    print(f"{'seconds per image':40s} {1 / rate:10.2f}")
    if compare:
        print(f"{'one image, width %g: batched s' % compare['width']:40s} {compare['batched_s']:10.2f}")
        print(f"{'one image, width %g: loop s' % compare['width']:40s} {compare['loop_s']:10.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
