"""bench/gpu_check.py: the CPU quick mode runs every section end to end (so the GPU command cannot rot
while no GPU is at hand), a missing CUDA is one error line, the pipeline estimate adds up, and every
benchmark records the machine it ran on."""
from __future__ import annotations

import json
import re

import pytest
import torch

from bench import gpu_check
from bench._meta import machine_meta
from conftest import ROOT

META_KEYS = {"load_average_1_5_15min", "cpu_model", "cpu_count", "cpu_affinity", "torch_threads", "torch", "cuda"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "quick.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_mode_runs_every_section(quick):
    assert quick["profile"] == "quick" and quick["device_name"] == "cpu"
    assert set(quick["section_status"]) == set(gpu_check.SECTIONS)
    assert {s: st["status"] for s, st in quick["section_status"].items()} == {s: "ok" for s in gpu_check.SECTIONS}
    parity = quick["sections"]["parity"]
    assert set(parity) == {"net_gpp", "par", "ktse_losses", "irn", "deeplabv2_beco"}
    assert all(r["pass"] for r in parity.values()), parity
    rows = gpu_check.table_rows(quick["sections"])
    assert len(rows) == 23  # 8 stage-one + 2 CAM + 4 + 3 IRN label + 2 IRN train + 2 BECO train + 2 BECO test
    for sec, config, prec, rate, _, _ in rows:
        assert float(rate) > 0, (sec, config, prec)
    for sec in ("stage1_train", "beco_train"):  # the speed toggles: plain and bf16 measured on CPU
        speed = quick["sections"][sec]["speed"]
        assert set(speed) == {"off", *gpu_check.SPEED_TOGGLES}, speed
        assert speed["off"]["images_per_s"] > 0 and speed["bf16"]["parity_ok"], speed["bf16"]
        assert all(speed[t] == {"skipped": "CUDA only"} for t in ("channels_last", "cudnn_benchmark", "compile"))
    walk = quick["sections"]["irn_label"]["walk_chunked"]["fp32"]
    assert walk["walk_bytes_estimate"] > 0 and walk["grid_hw"] == [10, 13]
    ddp = quick["sections"]["ddp"]
    assert ddp["backend"] == "gloo" and all(ddp[t]["ok"] for t in ("stage1", "irn", "beco")), ddp
    for prec in gpu_check.PRECISIONS:
        assert quick["estimate_gpu_hours"][prec]["total"] > 0
    assert META_KEYS <= set(quick["machine_meta"]) and quick["machine_meta"]["cpu_model"]


def test_cuda_unavailable_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gpu_check: --device cuda but CUDA is not available")
    assert "--device cpu --quick" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_estimate_from_rates():
    def rate(r: float) -> dict:
        return {"fp32": {"images_per_s": r}, "amp": {"images_per_s": 2 * r}}

    sections = {"stage1_train": {"batch8_cls": rate(10.0), "batch16_ktse": rate(5.0)},
                "cam_infer": {"msf_cam": rate(2.0)},
                "irn_label": {"make_cam": rate(4.0), "edge": rate(4.0), "walk_dense": {"fp32": {"images_per_s": 2.0}}},
                "irn_train": {"step": rate(20.0)}, "beco_train": {"step": rate(8.0)},
                "beco_test": {"msc_test": rate(1.0)}}
    est = gpu_check.pipeline_estimate(sections, gpu_check.FULL)
    n = gpu_check.VOC_TRAIN_AUG
    sched = gpu_check.beco_schedule()
    assert sched["batch_size"] == 16 and sched["max_epoch"] == 100
    fp32 = est["fp32"]
    assert fp32["stage1_train"] == round((10 * n / 10 + 30 * n / 5) / 3600, 3)
    assert fp32["irn_label"] == round(n * (1 / 4 + 1 / 4 + 1 / 2) / 3600, 3)
    assert fp32["irn_train"] == round(3 * (n // 32 * 32) / 20 / 3600, 3)
    assert fp32["beco_train"] == round(100 * (n // 16 * 16) / 8 / 3600, 3)
    assert est["amp"]["cam_infer"] == round(n / 4 / 3600, 3)  # AMP rows use the AMP rates; the walk stays fp32
    assert est["amp"]["irn_label"] == round(n * (1 / 8 + 1 / 8 + 1 / 2) / 3600, 3)
    del sections["beco_test"]
    assert gpu_check.pipeline_estimate(sections, gpu_check.FULL)["fp32"]["total"] is None


def test_every_benchmark_records_the_machine():
    meta = machine_meta()
    assert META_KEYS <= set(meta) and len(meta["load_average_1_5_15min"]) == 3 and meta["torch_threads"] >= 1
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    assert {p.name for p in scripts} >= {"beco_speed.py", "eval_speed.py", "infer_speed.py", "random_walk.py",
                                         "train_step.py", "gpu_check.py"}
    for p in scripts:
        src = p.read_text(encoding="utf-8")
        assert re.search(r"from bench\._meta import .*machine_meta", src), p.name
        assert '"machine_meta": machine_meta()' in src, p.name


def test_beco_step_halves_the_batch_when_out_of_memory(monkeypatch):
    from segmentation.beco import engine

    real = engine.train_step

    def tight(model, opt, img, *rest):
        if img.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, opt, img, *rest)

    monkeypatch.setattr(engine, "train_step", tight)
    out: dict = {}
    gpu_check.section_beco_train(torch.device("cpu"), gpu_check.QUICK, gpu_check.Clock(60), out)
    for prec in gpu_check.PRECISIONS:
        r = out["step"][prec]
        assert r["batch"] == 1 and r["images_per_s"] > 0 and "ran out of memory" in r["note"], r
