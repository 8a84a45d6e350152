"""infer.py speed: images/s of the multi-scale + flip CAM inference at VOC size.

Builds a tiny VOC-format tree of synthetic 500x375 / 375x500 JPEGs (2 classes each) and a checkpoint of
a randomly initialised ``Net_gpp`` (reference width by default: speed does not depend on the weights),
runs the ``infer.py --dict`` work (:func:`models.cam_infer.run`, model load included) and reports images/s;
then, on one image, the batched MSF forward (a scale and its flip as one batch; this project's path)
against the reference-style one-input-at-a-time loop, each in its own subprocess so that its peak resident
set (``ru_maxrss`` of that process: model, inputs and activations) is its own. The JSON holds both peaks,
``ratio_batched_over_loop`` (time) and ``ratio_peak_rss_batched_over_loop``, and whether the two paths'
CAMs are equal (``outputs_equal``: bit for bit; ``outputs_allclose``: within float rounding).

Every time is a ``bench._meta.stable_time`` record. One infer.py run at reference width takes about
65 s per image on 2 CPU cores, so there it is run once by default and recorded as not stable
(``--max_repeats``/``--max_seconds`` to repeat it).

    python bench/infer_speed.py [--n 2] [--width 1.0] [--device cpu] [--threads N]

Writes ``bench/results/infer_speed.json`` (``--out``); with ``--device cuda`` the file name gets a
``_cuda`` suffix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
from bench._meta import TIMING_HEADER, machine_meta, stable_time, timing_cells  # noqa: E402
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


def compare_one(image: str, out_npy: str, width: float, device: str, threads: int | None, batched: bool,
                timing: dict) -> dict:
    """In a fresh process: the MSF CAM of ``image`` by a seeded ``Net_gpp(width)``, batched or one input at
    a time; one warm-up call, then :func:`bench._meta.stable_time` (``timing``: its keyword arguments).
    Saves the CAM dict to ``out_npy``; returns the timing record and this process's peak RSS in MiB."""
    import resource

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    net = Net_gpp(width=width).eval().to(dev)
    img = np.asarray(Image.open(image).convert("RGB"))
    inputs = msf_inputs(img)
    label = np.eye(20, dtype=np.float32)[3] + np.eye(20, dtype=np.float32)[14]
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cam = [msf_cam(net, inputs, label, img.shape[:2], batch_same_shape=batched)]  # warm-up
    t = stable_time(lambda: cam.__setitem__(0, msf_cam(net, inputs, label, img.shape[:2],
                                                        batch_same_shape=batched)),
                    sync=torch.cuda.synchronize if dev.type == "cuda" else None, **timing)
    np.save(out_npy, cam[0])
    res = {"timing": t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_build_mib": rss_build}
    if dev.type == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def _compare_in_subprocess(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--_compare", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"the comparison subprocess failed:\n{r.stderr[-2000:]}")
    return json.loads(line[0][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2, help="images (each = 8 forwards, up to 1000x750)")
    ap.add_argument("--width", type=float, default=1.0, help="Net_gpp width (1.0 = reference)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--compare_width", type=float, default=0.25,
                    help="width of the batched-vs-loop comparison on one image (0 = skip)")
    ap.add_argument("--min_repeats", type=int, default=3, help="stable_time window (last N times)")
    ap.add_argument("--max_repeats", type=int, default=0,
                    help="stable_time cap on timed infer.py runs (0: 1 at width 1 on CPU, else 10)")
    ap.add_argument("--compare_max_repeats", type=int, default=10, help="stable_time cap, comparison rows")
    ap.add_argument("--max_seconds", type=float, default=None, help="stable_time cap on timed seconds per row")
    ap.add_argument("--rel_spread", type=float, default=0.05, help="stable when (max-min)/median <= this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_compare", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._compare:
        print("RESULT " + json.dumps(compare_one(**json.loads(a._compare))))
        return 0
    heavy = a.width == 1.0 and a.device == "cpu"
    tk = dict(min_repeats=a.min_repeats, rel_spread=a.rel_spread, max_seconds=a.max_seconds)
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
                             workers=a.workers, no_progress=True, threads=a.threads or None, overwrite=True)
        stats: list[dict] = []
        # a repeat redoes every image (overwrite); at reference width on CPU there is no warm-up run
        # (minutes per image), so the one timed run includes the first-call costs and is not stable
        if not heavy:
            run(args)
        t_run = stable_time(lambda: stats.append(run(args)), max_repeats=a.max_repeats or (1 if heavy else 10),
                            **tk)
        assert all(st["inferred"] == a.n for st in stats)
        assert len(list((tmp / "exp" / "bench" / "dict").glob("*.npy"))) == a.n

        compare = {}
        if a.compare_width > 0:
            image = str(tmp / "VOC2012" / "JPEGImages" / f"{ids[0]}.jpg")
            for mode, name in ((True, "batched"), (False, "loop")):
                compare[name] = _compare_in_subprocess(dict(
                    image=image, out_npy=str(tmp / f"cam_{name}.npy"), width=a.compare_width, device=a.device,
                    threads=a.threads, batched=mode, timing=dict(tk, max_repeats=a.compare_max_repeats)))
            cb, cl = (np.load(tmp / f"cam_{n}.npy", allow_pickle=True).item() for n in ("batched", "loop"))
            same_keys = sorted(cb) == sorted(cl)
            compare.update(
                width=a.compare_width,
                outputs_equal=same_keys and all(torch.equal(torch.from_numpy(cb[k]), torch.from_numpy(cl[k]))
                                                for k in cb),
                outputs_allclose=same_keys and all(np.allclose(cb[k], cl[k], rtol=1e-5, atol=1e-6) for k in cb),
                outputs_max_abs_diff=float(max(np.abs(cb[k] - cl[k]).max() for k in cb)) if same_keys else None,
                ratio_batched_over_loop=compare["batched"]["timing"]["median_s"] / compare["loop"]["timing"]["median_s"],
                ratio_peak_rss_batched_over_loop=compare["batched"]["peak_rss_mib"] / compare["loop"]["peak_rss_mib"],
                peak_rss_batched_le_loop=compare["batched"]["peak_rss_mib"] <= compare["loop"]["peak_rss_mib"])

    wall = t_run["median_s"]
    rate = a.n / wall
    result = {
        "device": a.device, "width": a.width, "images": a.n, "image_size": "500x375 / 375x500",
        "scales": [0.5, 1.0, 1.5, 2.0], "flips": True, "threads": torch.get_num_threads(),
        "loader_workers": a.workers, "images_per_s": rate, "s_per_image": 1 / rate,
        "wall_incl_model_load_s": wall, "infer_run_timing": t_run,
        "images_per_s_excl_model_load_last_run": stats[-1]["inferred"] / stats[-1]["seconds"],
        "batched_vs_loop_one_image": compare,
        "machine": f"{platform.node()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine_meta": machine_meta(),
    }
    if a.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"{'measure':40s} {TIMING_HEADER}")
    print(f"{'infer.py run, %d images (width %g, %s)' % (a.n, a.width, a.device):40s} {timing_cells(t_run)}")
    if compare:
        for name in ("batched", "loop"):
            c = compare[name]
            print(f"{'one image, width %g: %s' % (compare['width'], name):40s} {timing_cells(c['timing'])}"
                  f"  peak RSS {c['peak_rss_mib']:.0f} MiB")
    print(f"{'infer.py images/s (median run)':40s} {rate:9.4f}")
    print(f"{'seconds per image':40s} {1 / rate:9.2f}")
    if compare:
        print(f"{'ratio_batched_over_loop':40s} {compare['ratio_batched_over_loop']:9.2f}")
        print(f"{'ratio_peak_rss_batched_over_loop':40s} {compare['ratio_peak_rss_batched_over_loop']:9.2f}")
        print(f"{'outputs equal / allclose':40s} {compare['outputs_equal']} / {compare['outputs_allclose']}"
              f" (max abs diff {compare['outputs_max_abs_diff']:.1e})")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
