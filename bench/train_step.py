"""Benchmark one stage-one training step (KTSE+ update: forwards, PAR refinement, backward, SGD step).

    python bench/train_step.py                      # CPU, batch 8, crop 320, widths 1.0 and 0.125
    python bench/train_step.py --device cuda --amp  # GPU fp32 and AMP rows

Two phases: ``cls`` (epoch < T: one forward, classification loss only) and ``ktse`` (epoch >= T: the
four forwards, PAR pseudo labels, every KTSE(+) loss). Each configuration runs in a fresh subprocess so
its peak memory (CPU: peak RSS of the process; GPU: torch.cuda.max_memory_allocated) is its own.
Steps are timed by ``bench._meta.stable_time`` (after the warm-up steps) and, per width and precision, the
``ktse`` step is reported against the ``cls`` step of the same width as ``ratio_ktse_step_over_cls_step``
(both phases must be run). A reference-width step on CPU takes minutes, so there it is timed once by
default and recorded as not stable (``--max_repeats``/``--max_seconds`` to repeat it).
Prints a table and writes bench/results/train_step.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one(width: float, phase: str, batch: int, crop: int, warmup: int, device: str, amp: bool, threads: int,
        min_repeats: int, max_repeats: int, max_seconds: float | None, rel_spread: float) -> dict:
    import resource

    import torch

    from bench._meta import stable_time

    from models.ktse import KTSEConfig, KTSEStep, build_optimizer
    from models.resnet38d import Net_gpp
    from tools.misc import backward_step
    from tools.runtime import amp_setup

    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    net = Net_gpp(width=width)
    opt = build_optimizer(net, 0.01, 5e-4, 1000)
    net.to(dev).train()
    step = KTSEStep(net, cfg=KTSEConfig(ktse_start_epoch=10, safe_ce=True)).to(dev)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, crop, crop, generator=g).to(dev)
    img2 = torch.randn(batch, 3, crop, crop, generator=g).to(dev)
    y = torch.zeros(batch, 20)
    y[:, 14] = 1  # a shared class, as the pair dataset guarantees
    y[::2, 8] = 1
    y2 = y.roll(1, 0).clone()
    y2[:, 14] = 1
    y, y2 = y.to(dev), y2.to(dev)
    epo = 0 if phase == "cls" else 10
    autocast, scaler = amp_setup(dev, amp)  # the trainers' AMP (fp16 + GradScaler on CUDA, bf16 on CPU)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = step(img, img2, y, y2, epo)
        backward_step(out["loss"], opt, scaler)

    for _ in range(warmup):
        run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timing = stable_time(run, min_repeats=min_repeats, max_repeats=max_repeats, rel_spread=rel_spread,
                         max_seconds=max_seconds, sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    sec = timing["median_s"]
    res = {"width": width, "phase": phase, "batch": batch, "crop": crop, "device": device, "amp": amp,
           "threads": torch.get_num_threads(), "steps": timing["repeats"], "sec_per_step": sec,
           "images_per_s": batch / sec, "timing": timing, "params": sum(p.numel() for p in net.parameters())}
    if dev.type == "cuda":
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        res["gpu"] = torch.cuda.get_device_name()
    else:
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["rss_after_build_mib"] = rss_model
    return res


def _ratios(rows: list[dict]) -> list[dict]:
    """Per (width, precision) with both phases: the ktse step's median over the cls step's median."""
    out = []
    for r in rows:
        base = [b for b in rows if b["phase"] == "cls" and b["width"] == r["width"] and b["amp"] == r["amp"]]
        if r["phase"] == "ktse" and base:
            out.append({"width": r["width"], "amp": r["amp"],
                        "ratio_ktse_step_over_cls_step": r["sec_per_step"] / base[0]["sec_per_step"],
                        "both_stable": r["timing"]["stable"] and base[0]["timing"]["stable"]})
    return out


def _write(path: str, rows: list[dict], note: str = "") -> None:
    from bench._meta import machine_meta
    from tools.io import atomic_write_json

    out = {"benchmark": "stage-one training step (KTSE+)", "host": platform.node(), "cpu_count": os.cpu_count(),
           "machine_meta": machine_meta(),
           "note": "cls = epoch < T (classification only); ktse = epoch >= T (4 forwards + PAR + all losses). "
                   "CPU memory is the process peak RSS (includes the model, gradients and optimizer state). " + note,
           "rows": rows, "ratios": _ratios(rows)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.125])
    p.add_argument("--phases", nargs="+", default=["cls", "ktse"], choices=["cls", "ktse"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--max_repeats", type=int, default=0,
                   help="stable_time cap on timed steps (0: 1 at width 1 on CPU, else 10)")
    p.add_argument("--min_repeats", type=int, default=3, help="stable_time window (last N steps)")
    p.add_argument("--max_seconds", type=float, default=None, help="stable_time cap on timed seconds per row")
    p.add_argument("--rel_spread", type=float, default=0.05, help="stable when (max-min)/median <= this")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps (-1: 0 at width 1 on CPU, else 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="also run AMP rows")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        cfg = json.loads(a._one)
        print("RESULT " + json.dumps(one(**cfg)))
        return 0
    from bench._meta import spread_text, stability_text

    rows = []
    for amp in ([False, True] if a.amp else [False]):
        for w in a.widths:
            for ph in a.phases:
                heavy = w == 1.0 and a.device == "cpu"
                cfg = dict(width=w, phase=ph, batch=a.batch, crop=a.crop, device=a.device, amp=amp, threads=a.threads,
                           max_repeats=a.max_repeats or (1 if heavy else 10), min_repeats=a.min_repeats,
                           max_seconds=a.max_seconds, rel_spread=a.rel_spread,
                           warmup=a.warmup if a.warmup >= 0 else (0 if heavy else 1))
                r = subprocess.run([sys.executable, __file__, "--_one", json.dumps(cfg)], capture_output=True,
                                   text=True, cwd=ROOT)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(r.stderr[-2000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(line[0][7:]))
                res = rows[-1]
                mem = res.get("peak_mem_mib", res.get("peak_rss_mib"))
                print(f"width {w:<6g} {ph:<5} {'amp' if amp else 'fp32':<5} {res['sec_per_step']:8.2f} s/step "
                      f"{res['images_per_s']:7.2f} img/s  peak {mem:8.0f} MiB  {stability_text(res['timing'])}",
                      flush=True)
                _write(a.out, rows, a.note)  # after every row: a long run interrupted keeps what it measured
    print("\n| width | phase | precision | median s/step | spread | stability | images/s | peak MiB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("peak_mem_mib", r.get("peak_rss_mib"))
        t = r["timing"]
        print(f"| {r['width']:g} | {r['phase']} | {'amp' if r['amp'] else 'fp32'} | {r['sec_per_step']:.2f} | "
              f"{spread_text(t)} | {stability_text(t)} | {r['images_per_s']:.2f} | {mem:.0f} |")
    for q in _ratios(rows):
        print(f"width {q['width']:g} {'amp' if q['amp'] else 'fp32'}: ratio_ktse_step_over_cls_step "
              f"{q['ratio_ktse_step_over_cls_step']:.2f}{'' if q['both_stable'] else ' (not both stable)'}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
