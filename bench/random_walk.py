"""Benchmark: IRN random walk (the make_sem_seg_labels step) seconds per image.

VOC-size image (default 500×375 → 94×125 stride-4 grid, 11,750 pixels), 3 classes, beta 10,
exp_times 8 (T^256), synthetic smooth edge map and CAMs.  Modes:
* ``sparse`` — this project's CPU path (sparse iteration, float64), timed at VOC size;
* ``dense``  — the reference formulation (float32 dense matrix squaring).  At VOC size the dense
  matrix is 11,750² (552 MB) and each of the 8 squarings costs 3.2 TFLOP, so on CPU it is timed
  at a smaller size (``--dense_size``), and at VOC size squaring by squaring on the real transition
  matrix within a time budget (``--dense_voc_one_square``); on CUDA it runs in full.
Both paths are cross-checked on the small size, and ``ratio_dense_over_sparse`` (in the same run, same
size) stands next to the absolute times.  Every time is a ``bench._meta.stable_time`` record (repeated
until the last times agree within ``--rel_spread``).  Prints a table and writes
``bench/results/random_walk.json`` (``--out``).

Usage: python bench/random_walk.py [--size 500 375] [--max_repeats 10] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irn.random_walk import propagate_to_edge  # noqa: E402
from bench._meta import TIMING_HEADER, machine_meta, stable_time, timing_cells  # noqa: E402
from tools.io import atomic_write_json  # noqa: E402


def synthetic_inputs(width: int, height: int, n_cls: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random CAMs (C,h,w) max-normalised and a boundary map (1,h,w) in (0,1)."""
    h, w = (height - 1) // 4 + 1, (width - 1) // 4 + 1
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, n_cls + 1, max(2, h // 8), max(2, w // 8), generator=g)
    field = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    cams = field[:n_cls]
    cams = cams / cams.flatten(1).max(1).values[:, None, None]
    gy, gx = torch.gradient(field[n_cls])
    edge = torch.sigmoid(40 * (gy.abs() + gx.abs()) - 3)[None]
    return cams.float().contiguous(), edge.float().contiguous()


def timed(fn, a: argparse.Namespace, max_repeats: int | None = None) -> tuple[dict, object]:
    """One warm-up call of ``fn``, then :func:`bench._meta.stable_time` under the run's flags; returns the
    timing record and ``fn``'s last output."""
    out = [fn()]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    rec = stable_time(lambda: out.__setitem__(0, fn()), min_repeats=a.min_repeats,
                      max_repeats=max_repeats or a.max_repeats, rel_spread=a.rel_spread,
                      max_seconds=a.max_seconds, sync=sync)
    return rec, out[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    ap.add_argument("--dense_size", type=int, nargs=2, default=(200, 150), metavar=("W", "H"))
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--min_repeats", type=int, default=3, help="stable_time window (last N times)")
    ap.add_argument("--max_repeats", type=int, default=10, help="stable_time cap on timed calls")
    ap.add_argument("--max_seconds", type=float, default=None, help="stable_time cap on timed seconds per row")
    ap.add_argument("--rel_spread", type=float, default=0.05, help="stable when (max-min)/median <= this")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "random_walk.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dense_voc_one_square", action="store_true",
                    help="also time the dense chain at --size on CPU, squaring by squaring on the real matrix "
                         "(minutes on 2 cores; see --dense_voc_budget_s)")
    ap.add_argument("--dense_voc_budget_s", type=float, default=300.0,
                    help="stop measuring squarings once this many seconds are spent (the rest are counted at "
                         "the last one's time, a lower bound)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    rows = []

    def record(mode: str, size, timing: dict, note: str = "", scale: float = 1.0) -> dict:
        rows.append({"mode": mode, "device": dev.type, "image_wh": list(size), "classes": a.classes,
                     "seconds_per_image": round(scale * timing["median_s"], 4), "timing": timing, "note": note})
        return rows[-1]

    cams, edge = synthetic_inputs(*a.size, n_cls=a.classes)
    t, rw_sparse = timed(lambda: propagate_to_edge(cams, edge, mode="sparse"), a)
    sparse_voc = record("sparse (float64)", a.size, t)
    # cross-check on the small size, where dense is cheap on CPU
    cs, es = synthetic_inputs(*a.dense_size, n_cls=a.classes)
    ts, rs = timed(lambda: propagate_to_edge(cs, es, mode="sparse"), a)
    td, rd = timed(lambda: propagate_to_edge(cs.to(dev), es.to(dev), mode="dense"), a)
    rel = float((rd.double().cpu() - rs).abs().max() / rs.abs().max())
    record("sparse (float64)", a.dense_size, ts)
    record("dense (float32, reference)", a.dense_size, td, f"max rel diff vs sparse {rel:.2e}")
    # the baseline is the sparse row of the same size, timed in this same run
    ratios = {"ratio_dense_over_sparse": {"image_wh": list(a.dense_size), "value": td["median_s"] / ts["median_s"]}}
    if dev.type == "cuda":
        cams_d, edge_d = cams.to(dev), edge.to(dev)
        t, rw = timed(lambda: propagate_to_edge(cams_d, edge_d, mode="dense"), a)
        rel = float((rw.double().cpu() - rw_sparse).abs().max() / rw_sparse.abs().max())
        record("dense (float32, reference)", a.size, t, f"max rel diff vs sparse {rel:.2e}")
        ratios["ratio_dense_over_sparse_full_size"] = {"image_wh": list(a.size),
                                                       "value": t["median_s"] / sparse_voc["timing"]["median_s"]}
    elif a.dense_voc_one_square:
        # The reference's dense chain at full size, squaring by squaring on the real transition matrix,
        # until --dense_voc_budget_s is spent. A random matrix squares at the full BLAS rate, but the real
        # powers fill with subnormal floats far from the diagonal, and CPUs multiply those far slower: an
        # extrapolation from a random matrix came out about 6x too low. Squarings left unmeasured are
        # counted at the last measured one's time, so the total is a lower bound when they were cut.
        from irn.random_walk import _dense_transition

        n = cams.shape[1] * cams.shape[2]
        m = torch.rand(n, n)
        rand = stable_time(lambda: torch.matmul(m, m), max_repeats=1)
        del m
        chain = [_dense_transition(edge, 5, 10, 0)]
        steps = []
        for _ in range(8):
            if steps and sum(x["median_s"] for x in steps) > a.dense_voc_budget_s:
                break
            steps.append(stable_time(lambda: chain.__setitem__(0, torch.matmul(chain[0], chain[0])), max_repeats=1))
        measured = [x["median_s"] for x in steps]
        total = sum(measured) + (8 - len(measured)) * measured[-1]
        cut = len(measured) < 8
        timing = {**steps[-1], "median_s": total, "times_s": measured}
        record("dense (float32, reference)", a.size, timing,
               f"{len(measured)} of 8 squarings of the real T measured ({', '.join(f'{t:.1f}' for t in measured)} s)"
               + ("; the rest counted at the last: a lower bound" if cut else "")
               + f"; a random {n}x{n} squaring: {rand['median_s']:.1f} s")
        ratios["ratio_dense_over_sparse_full_size"] = {
            "image_wh": list(a.size), "value": total / sparse_voc["timing"]["median_s"],
            "note": ("lower bound: " if cut else "") + f"{len(measured)} of 8 squarings measured",
            "random_matrix_squaring_s": rand["median_s"], "squaring_s": measured}

    print(f"random walk, beta 10, exp_times 8, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'mode':<28} {'device':<6} {'image':<9} {'s/image':>9} {TIMING_HEADER}  note")
    for r in rows:
        print(f"{r['mode']:<28} {r['device']:<6} {r['image_wh'][0]}x{r['image_wh'][1]:<5} "
              f"{r['seconds_per_image']:>9.3f} {timing_cells(r['timing'])}  {r['note']}")
    for k, v in ratios.items():
        print(f"{k} ({v['image_wh'][0]}x{v['image_wh'][1]}): {v['value']:.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
                              **ratios, "machine_meta": machine_meta()})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
