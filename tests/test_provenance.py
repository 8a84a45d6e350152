"""tools.provenance and every step that reuses finished outputs: a rerun reuses them only when the
record of what made them matches; changed inputs recompute derived outputs (one line names the
change), stop IRN training (it asks for --overwrite), and an interrupted run finishes with the
same files as an uninterrupted one."""
from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_module
import torch

from tools.errors import WSSSError
from tools.provenance import (RECORD_NAME, Provenance, describe_change, file_id, read_record, record_path_for,
                              sha256_file, stat_key, upstream_id)
from voc12.data import read_id_list

ROOT = Path(__file__).resolve().parents[1]


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def _bump(path: Path) -> None:
    """Give ``path`` a new mtime (as rewriting it would)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# ----------------------------------------------------------------------------------------------
# the mechanism


def _fake_step(out: Path, ids: list[str], setting: int, src: Path, made: list[str], overwrite: bool = False,
               stop_after: int | None = None) -> None:
    """A per-id step: ``<out>/<id>.txt`` = setting + the content of ``<src>/<id>``."""
    prov = Provenance(out, "fake", 1, {"weights": file_id(src / "w.bin", content=True)}, {"setting": setting})
    outputs = lambda i: [out / f"{i}.txt"]  # noqa: E731
    plan = prov.start(ids, outputs, lambda i: stat_key(src / i), overwrite, "files")
    for n, i in enumerate(plan.todo):
        if stop_after is not None and n == stop_after:
            raise KeyboardInterrupt
        out.mkdir(exist_ok=True)
        (out / f"{i}.txt").write_text(f"{setting} {(src / i).read_text()}")
        made.append(i)
    prov.finish()


def test_record_rules(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    ids = ["a", "b", "c", "d"]
    for i in ids:
        (src / i).write_text(i)
    (src / "w.bin").write_bytes(b"weights one")
    made: list[str] = []
    _fake_step(out, ids, 1, src, made)
    assert made == ids and read_record(out / RECORD_NAME)["state"] == "complete"
    assert "recomputing" not in capsys.readouterr().out  # a first run names no change
    # nothing changed: nothing is redone
    made.clear()
    _fake_step(out, ids, 1, src, made)
    assert made == []
    # a new list adds ids (the others are kept); an edited input redoes its id only
    (src / "e").write_text("e")
    (src / "b").write_text("B!")
    _fake_step(out, ids + ["e"], 1, src, made)
    assert made == ["b", "e"]
    # a changed setting recomputes everything and says so in one line
    made.clear()
    _fake_step(out, ids, 2, src, made)
    assert made == ids and capsys.readouterr().out.strip() == "fake: setting changed (1 -> 2); recomputing 4 files"
    # same bytes under a new mtime: still the same weights (content identity)
    _bump(src / "w.bin")
    made.clear()
    _fake_step(out, ids, 2, src, made)
    assert made == []
    # other weights: named with both hashes
    (src / "w.bin").write_bytes(b"weights two")
    with pytest.raises(KeyboardInterrupt):
        _fake_step(out, ids, 2, src, made, stop_after=2)
    line = capsys.readouterr().out
    assert line.startswith(f"fake: weights changed ({src / 'w.bin'}: sha256 ") and "recomputing 4 files" in line
    # interrupted: the record is 'running'; outputs of the old weights were deleted, never mixed
    rec = read_record(out / RECORD_NAME)
    assert rec["state"] == "running" and sorted(p.name for p in out.glob("*.txt")) == ["a.txt", "b.txt", "e.txt"]
    made.clear()
    _fake_step(out, ids, 2, src, made)
    assert made == ["c", "d"] and read_record(out / RECORD_NAME)["state"] == "complete"
    # 'e' was made from the old weights and is not in this record's items any more: redone when listed
    made.clear()
    _fake_step(out, ids + ["e"], 2, src, made)
    assert made == ["e"]
    # --overwrite redoes all
    made.clear()
    _fake_step(out, ids, 2, src, made, overwrite=True)
    assert made == ids
    # outputs with no record at all are not trusted
    (out / RECORD_NAME).unlink()
    made.clear()
    _fake_step(out, ids, 2, src, made)
    assert made == ids and "no record of what made the existing outputs" in capsys.readouterr().out


def test_hash_cache_and_upstream(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x" * 3_000_000)
    a = sha256_file(f)
    import tools.provenance as tp

    calls = []
    real = tp.hashlib.sha256
    monkeypatch.setattr(tp.hashlib, "sha256", lambda *x: calls.append(1) or real(*x))
    assert sha256_file(f) == a and calls == []  # cached by (path, size, mtime)
    _bump(f)
    assert sha256_file(f) == a and calls == [1]  # new mtime: hashed again, same content
    monkeypatch.undo()
    # a downstream record quotes the upstream record's digest; a recomputed upstream changes it
    up = tmp_path / "up"
    p = Provenance(up, "up", 1, {}, {"k": 1})
    p.start(["x"], lambda i: [up / i], None, False, "x")
    p.finish()
    u1 = upstream_id(up)
    assert u1["record"] == p.digest and u1["complete"]
    Provenance(up, "up", 1, {}, {"k": 2}).start(["x"], lambda i: [up / i], None, False, "x")
    u2 = upstream_id(up)
    assert u2["record"] != u1["record"] and not u2["complete"]
    assert upstream_id(tmp_path / "none")["record"] is None
    assert record_path_for(tmp_path / "w.pth", is_dir=False).name == ".w.pth.provenance.json"
    old = {"digest": "0", "version": 1, "inputs": {"ckpt": {"path": "a", "size": 1, "sha256": "ab" * 32}},
           "settings": {"s": 1}}
    new = {"digest": "1", "version": 1, "inputs": {"ckpt": {"path": "a", "size": 1, "sha256": "cd" * 32}},
           "settings": {"s": 1}}
    assert describe_change(old, new) == "ckpt changed (a: sha256 abababab.. -> cdcdcdcd..)"


# ----------------------------------------------------------------------------------------------
# gen_mask


def _score_files(folder: Path, n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{k:06d}" for k in range(n)]
    for i in ids:
        score = torch.rand((3, 9, 11), generator=g)
        torch.save({"pred": torch.argmax(score, 0), "score": score, "keys": torch.tensor([0, 3, 7])},
                   folder / f"{i}.pt")
    return ids


def test_gen_mask_reuses_only_matching_masks(tmp_path, capsys, monkeypatch):
    gen_mask = cli_module("irn/gen_mask.py")
    import irn.steps.gen_mask as gm

    score, masks, ref = tmp_path / "score", tmp_path / "mask", tmp_path / "ref"
    ids = _score_files(score, 5)
    argv = ["--score_dir", str(score), "--mask_out_dir", str(masks), "--num_workers", "1"]
    assert gen_mask.main(argv) == 0
    assert gen_mask.main(["--score_dir", str(score), "--mask_out_dir", str(ref), "--num_workers", "1"]) == 0
    capsys.readouterr()
    before = _mtimes(masks, "*.png")
    assert gen_mask.main(argv) == 0
    assert "0 of 5 masks to do" in capsys.readouterr().out and _mtimes(masks, "*.png") == before
    # a rewritten score file redoes its mask only
    _bump(score / f"{ids[1]}.pt")
    assert gen_mask.main(argv) == 0
    assert "1 of 5 masks to do" in capsys.readouterr().out
    # another threshold redoes every mask (one line names it); interrupted after 2, the rerun finishes
    calls = []
    real = gm.save_png

    def flaky(path, arr, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, arr, *a, **k)

    monkeypatch.setattr(gm, "save_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        gm.run(gen_mask.build_parser().parse_args(argv + ["--thd", "0.3"]))
    assert "gen_mask: thd changed (0.5 -> 0.3); recomputing 5 masks" in capsys.readouterr().out
    monkeypatch.setattr(gm, "save_png", real)
    assert gen_mask.main(argv + ["--thd", "0.3"]) == 0
    assert "3 of 5 masks to do" in capsys.readouterr().out
    assert gen_mask.main(["--score_dir", str(score), "--mask_out_dir", str(ref), "--num_workers", "1",
                          "--thd", "0.3"]) == 0
    for i in ids:
        assert (masks / f"{i}.png").read_bytes() == (ref / f"{i}.png").read_bytes()


# ----------------------------------------------------------------------------------------------
# BECO test.py


def _beco_logits(voc: Path, tmp_path: Path, n: int):
    """segmentation/test.py, the first ``n`` val ids, their list file, a folder of random logits for
    them (``<tmp>/tag/logits_msc``) and the generator that made them."""
    sys.path.insert(0, str(ROOT / "segmentation"))
    test_py = cli_module("segmentation/test.py")
    ids = read_id_list(voc / "lists" / "val.txt")[:n]
    lst = tmp_path / f"val{n}.txt"
    lst.write_text("\n".join(ids) + "\n")
    logits = tmp_path / "tag" / "logits_msc"
    logits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        np.save(logits / f"{i}.npy", rng.standard_normal((21, 5, 6)).astype(np.float32))
    return test_py, ids, lst, logits, rng


def test_beco_test_reuses_predictions_only_for_the_same_logits(toy_voc, tmp_path, capsys):
    test_py, ids, lst, logits, rng = _beco_logits(toy_voc, tmp_path, 3)
    argv = ["--logits_dir", str(logits), "--data_root", str(toy_voc), "--list", str(lst), "--n-jobs", "1",
            "--label_folder", "SegmentationClass"]
    assert test_py.main(argv) == 0
    pred = tmp_path / "tag" / "val_pred"
    before = _mtimes(pred, "*.png")
    assert read_record(pred / RECORD_NAME)["state"] == "complete" and not (pred / "settings.json").exists()
    assert test_py.main(argv) == 0
    assert _mtimes(pred, "*.png") == before
    # new logits for one image: that prediction only
    np.save(logits / f"{ids[0]}.npy", rng.standard_normal((21, 5, 6)).astype(np.float32))
    assert test_py.main(argv) == 0
    after = _mtimes(pred, "*.png")
    assert [k for k in after if after[k] != before[k]] == [f"{ids[0]}.png"]
    pytest.importorskip("pydensecrf.densecrf")
    capsys.readouterr()
    assert test_py.main(argv + ["--crf"]) == 0
    assert "test.py: crf changed (false -> true)" in capsys.readouterr().out
    assert all(v != after[k] for k, v in _mtimes(pred, "*.png").items())


# ----------------------------------------------------------------------------------------------
# the pipeline runner


def _writer(name: str, value: str) -> list[str]:
    code = (f"import pathlib, sys; pathlib.Path('{name}').write_text('{value}' + ' '.join(sys.argv[1:])); "
            f"pathlib.Path('ran.txt').open('a').write('{name}\\n')")
    return ["python", "-c", code]


def _chain(train_value: str = "lr1") -> list:
    from pipeline.runner import Step

    return [Step("data", "data", _writer("d.txt", "d"), outputs=["d.txt"]),
            Step("train", "stage1", _writer("t.txt", train_value), outputs=["t.txt"], needs=["data"],
                 overwrite_args=["--overwrite"]),
            Step("infer", "stage1", _writer("i.txt", "i"), outputs=["i.txt"], needs=["train"],
                 overwrite_args=["--overwrite"]),
            Step("eval", "stage1", _writer("e.txt", "e"), outputs=["e.txt"], needs=["infer"]),
            Step("irn", "irn", _writer("r.txt", "r"), outputs=["r.txt"], needs=["train"])]


def test_pipeline_redoes_a_changed_step_and_its_readers_only(tmp_path, capsys):
    from pipeline.runner import run_steps

    rec = tmp_path / "rec"
    ran = tmp_path / "ran.txt"
    res = run_steps(_chain(), rec, root=tmp_path, echo=False)
    assert [r.skipped for r in res] == [False] * 5
    assert ran.read_text().split() == ["d.txt", "t.txt", "i.txt", "e.txt", "r.txt"]
    ran.unlink()
    assert all(r.skipped for r in run_steps(_chain(), rec, root=tmp_path, echo=False)) and not ran.exists()
    # a changed stage-one setting: the dry run names what would run, nothing runs
    capsys.readouterr()
    run_steps(_chain("lr2"), rec, root=tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert "[skip] data" in out and "# train: command changed (... " in out and "'lr1'" in out
    assert "# infer: upstream step train changed" in out and "# irn: upstream step train changed" in out
    assert "# eval: upstream step infer changed" in out
    assert not ran.exists()
    res = run_steps(_chain("lr2"), rec, root=tmp_path, echo=False)
    assert [r.skipped for r in res] == [True, False, False, False, False]
    assert ran.read_text().split() == ["t.txt", "i.txt", "e.txt", "r.txt"]
    # redone with --overwrite (never resumed from outputs made with the other setting)
    assert (tmp_path / "t.txt").read_text() == "lr2--overwrite" and (tmp_path / "i.txt").read_text() == "i--overwrite"
    ran.unlink()
    assert all(r.skipped for r in run_steps(_chain("lr2"), rec, root=tmp_path, echo=False)) and not ran.exists()
    # a step rerun on its own (its outputs deleted) with the same command and upstream keeps its digest
    digest = json.loads((rec / "infer.json").read_text())["digest"]
    (tmp_path / "i.txt").unlink()
    res = run_steps(_chain("lr2"), rec, root=tmp_path, echo=False)
    # infer ran again (same command: a plain run that may resume), so the step reading it is redone:
    # a rerun need not give the same bytes (a GPU training is not bit-exact)
    assert [r.skipped for r in res] == [True, True, False, False, True]
    assert (tmp_path / "i.txt").read_text() == "i"
    assert json.loads((rec / "infer.json").read_text())["digest"] == digest
    # an interrupted attempt of another command is not resumed: its running record names the command
    from pipeline.runner import Step, StepFailed

    broken = _chain("lr2")
    broken[1] = Step("train", "stage1", ["python", "-c", "import sys; sys.exit(3)"], outputs=["t.txt"], needs=["data"])
    with pytest.raises(StepFailed):
        run_steps(broken, rec, root=tmp_path, echo=False)
    assert json.loads((rec / "train.json").read_text())["state"] == "running"
    ran.unlink()
    lines: list[str] = []
    res = run_steps(_chain("lr2"), rec, root=tmp_path, echo=False, printer=lines.append)
    assert (tmp_path / "t.txt").read_text() == "lr2--overwrite"
    assert ran.read_text().split() == ["t.txt", "i.txt", "e.txt", "r.txt"]  # train ran again: its readers too
    assert any(s.startswith("\n[redo] train: an interrupted attempt was made differently: command changed")
               for s in lines)
    # the same, left by an older runner (<step>.start.json, no record): read as that runner's record
    (rec / "train.json").unlink()
    json.dump({"command": "python train.py --old", "upstream": {}}, (rec / "train.start.json").open("w"))
    ran.unlink()
    res = run_steps(_chain("lr2"), rec, root=tmp_path, echo=False)
    assert (tmp_path / "t.txt").read_text() == "lr2--overwrite" and ran.read_text().split()[0] == "t.txt"
    assert not (rec / "train.start.json").exists()
    # run from a later step while the step it reads has no record: redone, saying so
    (rec / "data.json").unlink()
    capsys.readouterr()
    run_steps(_chain("lr2")[1:2], rec, root=tmp_path, dry_run=True)
    assert "# train: upstream step data has no record" in capsys.readouterr().out


def test_pipeline_reads_the_records_of_an_older_runner(tmp_path, capsys):
    """An experiment finished by the runner before provenance records (``command`` + ``upstream`` with
    time-based digests) is skipped as it was; a changed command there redoes that step and its readers."""
    from pipeline.runner import read_step_record, reader_identity, run_steps

    rec = tmp_path / "rec"
    rec.mkdir()
    chain = _chain()
    digests = {s.name: f"{n:064x}" for n, s in enumerate(chain)}
    for s in chain:
        ups = s.needs or []
        json.dump({"step": s.name, "stage": s.stage, "command": s.display(s.argv), "ran": s.display(s.argv),
                   "upstream": {u: digests[u] for u in ups}, "digest": digests[s.name], "seconds": 1.5,
                   "cpu_seconds": 1.0, "metrics": {"miou": 50.0}, "finished": "2026-01-01 00:00:00"},
                  (rec / f"{s.name}.json").open("w"))
        (tmp_path / s.outputs[0]).write_text("old")
    converted = read_step_record(rec, "infer")
    assert converted["state"] == "complete" and converted["seconds"] == 1.5
    assert converted["inputs"] == {"train": {"record": reader_identity(read_step_record(rec, "train"))}}
    res = run_steps(_chain(), rec, root=tmp_path, echo=False)
    assert all(r.skipped for r in res) and [r.seconds for r in res] == [1.5] * 5
    assert res[2].metrics == {"miou": 50.0} and not (tmp_path / "ran.txt").exists()
    # an upstream digest that is not the one in that step's record: that step is redone
    old = json.loads((rec / "eval.json").read_text())
    json.dump({**old, "upstream": {"infer": "f" * 64}}, (rec / "eval.json").open("w"))
    res = run_steps(_chain(), rec, root=tmp_path, echo=False)
    assert [r.skipped for r in res] == [True, True, True, False, True]
    assert (tmp_path / "ran.txt").read_text().split() == ["e.txt"]
    (tmp_path / "ran.txt").unlink()
    # a changed command in an older runner's experiment: that step and its readers, nothing before it
    res = run_steps(_chain("lr2"), rec, root=tmp_path, echo=False)
    assert [r.skipped for r in res] == [True, False, False, False, False]
    assert (tmp_path / "ran.txt").read_text().split() == ["t.txt", "i.txt", "e.txt", "r.txt"]
    assert all("format" in json.loads((rec / f"{s.name}.json").read_text()) for s in chain[1:])


# ----------------------------------------------------------------------------------------------
# stage-one inference


@pytest.fixture(scope="module")
def infer_setup(tmp_path_factory, toy_voc):
    from models.resnet38d import Net_gpp

    work = tmp_path_factory.mktemp("infer_prov")
    ids = read_id_list(toy_voc / "lists" / "train.txt")[:4]
    (work / "four.txt").write_text("\n".join(ids) + "\n")
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = work / f"ck{seed}.pth"
        torch.save(Net_gpp(width=0.0625).state_dict(), p)
        ckpts.append(p)
    return work, toy_voc, ids, ckpts


def _infer_args(work: Path, voc: Path, ckpt: Path, root: str, *extra: str) -> list[str]:
    return ["--name", "t", "--load_epo", "0", "--dict", "--infer_list", str(work / "four.txt"), "--data_root",
            str(voc), "--cls_labels", str(voc / "lists" / "cls_labels.npy"), "--ckpt", str(ckpt), "--exp_root",
            str(work / root), "--device", "cpu", "--workers", "0", "--threads", "1", "--no_progress",
            "--scales", "1.0", *extra]


def test_infer_recomputes_dicts_of_another_checkpoint(infer_setup, capsys, monkeypatch, one_thread):
    infer = cli_module("infer.py")

    work, voc, ids, (ck0, ck1) = infer_setup
    d = work / "a" / "t" / "dict"
    assert infer.main(_infer_args(work, voc, ck0, "a")) == 0
    before = _mtimes(d, "*.npy")
    capsys.readouterr()
    assert infer.main(_infer_args(work, voc, ck0, "a")) == 0
    assert "0 to infer" in capsys.readouterr().out and _mtimes(d, "*.npy") == before
    # the --load_epo 39 then 31 case: another checkpoint into the same dict/ recomputes every dict
    assert infer.main(_infer_args(work, voc, ck1, "a")) == 0
    out = capsys.readouterr().out
    assert f"infer: stage-one checkpoint changed ({ck1.resolve()}: sha256 " in out
    assert f"recomputing {len(ids)} CAM dictionaries" in out and f"{len(ids)} to infer" in out
    after = _mtimes(d, "*.npy")
    assert all(after[k] != before[k] for k in before)
    # interrupted after 2 dictionaries of a scale change, the rerun finishes: same files as one run
    from models.cam_infer import Writer

    real = Writer.handle
    n = []

    def flaky(self, img_id, cam_dict, write_dict):
        if len(n) == 2:
            raise KeyboardInterrupt
        n.append(img_id)
        real(self, img_id, cam_dict, write_dict)

    monkeypatch.setattr(Writer, "handle", flaky)
    assert infer.main(_infer_args(work, voc, ck1, "a", "--scales", "1.0", "0.5")) == 130
    assert "scales changed ([1.0] -> [1.0, 0.5])" in capsys.readouterr().out
    monkeypatch.setattr(Writer, "handle", real)
    assert infer.main(_infer_args(work, voc, ck1, "a", "--scales", "1.0", "0.5")) == 0
    assert f"{len(ids) - 2} to infer" in capsys.readouterr().out
    assert infer.main(_infer_args(work, voc, ck1, "b", "--scales", "1.0", "0.5")) == 0
    for i in ids:
        a = np.load(d / f"{i}.npy", allow_pickle=True).item()
        b = np.load(work / "b" / "t" / "dict" / f"{i}.npy", allow_pickle=True).item()
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_infer_crf_from_saved_dicts_only_when_they_match(infer_setup, capsys, one_thread):
    pytest.importorskip("pydensecrf.densecrf")
    infer = cli_module("infer.py")

    work, voc, ids, (ck0, ck1) = infer_setup
    assert infer.main(_infer_args(work, voc, ck0, "c")) == 0
    capsys.readouterr()
    crf = ["--crf", "--alphas", "4"]
    assert infer.main(_infer_args(work, voc, ck0, "c", *crf)) == 0
    assert f"0 to infer, {len(ids)} to post-process" in capsys.readouterr().out
    c = work / "c" / "t" / "crf" / "04"
    before = _mtimes(c, "*.npy")
    assert infer.main(_infer_args(work, voc, ck0, "c", *crf)) == 0
    assert _mtimes(c, "*.npy") == before
    # another checkpoint: the saved dicts are not reused for the CRF; both are recomputed
    assert infer.main(_infer_args(work, voc, ck1, "c", *crf)) == 0
    out = capsys.readouterr().out
    assert f"{len(ids)} to infer, 0 to post-process" in out and "infer --crf: cams changed" in out
    assert all(v != before[k] for k, v in _mtimes(c, "*.npy").items())


# ----------------------------------------------------------------------------------------------
# IRN steps


def _irn_args(voc: Path, out: Path, ckpt: Path, ids_file: Path, **kw) -> Namespace:
    lists = voc / "lists"
    a = dict(voc12_root=str(voc), train_list=str(ids_file), infer_list=str(ids_file),
             cls_labels=str(lists / "cls_labels.npy"), cam_weights_name=str(ckpt.with_suffix("")), cam_width=None,
             cam_scales=(1.0,), conf_fg_thres=0.3, conf_bg_thres=0.1, irn_crop_size=96, irn_batch_size=4,
             irn_num_epoches=1, irn_learning_rate=0.1, irn_weight_decay=1e-4, irn_fix_momentum=False,
             irn_backbone_width=8, irn_backbone_init="none", resume=False, beta=10, exp_times=3,
             sem_seg_bg_thres=0.25, rw_mode="sparse", seed=0, num_workers=1, device="cpu", quiet=True,
             overwrite=False, cam_out_dir=str(out / "cam"), ir_label_out_dir=str(out / "ir_label"),
             sem_seg_out_dir=str(out / "sem_seg"), score_dir=str(out / "score"),
             irn_weights_name=str(out / "sess" / "res50_irn.pth"))
    a.update(kw)
    return Namespace(**a)


def test_irn_steps_follow_their_records(infer_setup, tmp_path, capsys, monkeypatch, one_thread):
    pytest.importorskip("pydensecrf.densecrf")
    from irn.steps import cam_to_ir_label, make_cam, make_sem_seg_labels, train_irn

    work, voc, ids, (ck0, ck1) = infer_setup
    lst = work / "four.txt"
    out = tmp_path / "irn"
    args = _irn_args(voc, out, ck0, lst)
    cam, irl = out / "cam", out / "ir_label"
    make_cam.run(args)
    cam_to_ir_label.run(args)
    cams, labels = _mtimes(cam, "*.npy"), _mtimes(irl, "*.png")
    # nothing changed: nothing recomputed
    make_cam.run(args)
    cam_to_ir_label.run(args)
    assert _mtimes(cam, "*.npy") == cams and _mtimes(irl, "*.png") == labels
    capsys.readouterr()
    # a swapped stage-one checkpoint: CAMs recomputed (one line), and so the IR labels after them
    args1 = _irn_args(voc, out, ck1, lst)
    make_cam.run(args1)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"make_cam: stage-one checkpoint changed ({ck1.resolve()}: sha256 ")
    assert line.endswith(f"recomputing {len(ids)} CAMs")
    cam_to_ir_label.run(args1)
    assert "cam_to_ir_label: cams changed" in capsys.readouterr().out
    assert all(v != labels[k] for k, v in _mtimes(irl, "*.png").items())
    labels = _mtimes(irl, "*.png")
    # another threshold: IR labels recomputed, CAMs kept
    cam_to_ir_label.run(_irn_args(voc, out, ck1, lst, conf_fg_thres=0.4))
    assert "conf_fg_thres changed (0.3 -> 0.4)" in capsys.readouterr().out
    assert all(v != labels[k] for k, v in _mtimes(irl, "*.png").items())
    # interrupted make_cam (a changed scale list) finishes with the files of one uninterrupted run
    real = make_cam.save_cam_dict
    n = []

    def flaky(*a):
        if len(n) == 2:
            raise KeyboardInterrupt
        n.append(a[0])
        real(*a)

    monkeypatch.setattr(make_cam, "save_cam_dict", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_cam.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5)))
    monkeypatch.setattr(make_cam, "save_cam_dict", real)
    make_cam.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5)))
    assert f"make_cam: {len(ids) - 2} of {len(ids)} images to do" in capsys.readouterr().out
    make_cam.run(_irn_args(voc, tmp_path / "ref", ck1, lst, cam_scales=(1.0, 0.5)))
    for i in ids:
        a = np.load(cam / f"{i}.npy", allow_pickle=True).item()
        b = np.load(tmp_path / "ref" / "cam" / f"{i}.npy", allow_pickle=True).item()
        assert all(np.array_equal(a[k], b[k]) for k in ("keys", "cam", "high_res"))

    # IRN training: skipped when the record matches, refused (naming the change) when it does not
    args = _irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5))
    cam_to_ir_label.run(args)
    train_irn.run(args)
    w = out / "sess" / "res50_irn.pth"
    t = w.stat().st_mtime_ns
    capsys.readouterr()
    train_irn.run(args)
    assert "same inputs and settings, skipping" in capsys.readouterr().out and w.stat().st_mtime_ns == t
    with pytest.raises(WSSSError, match=r"irn_learning_rate changed \(0.1 -> 0.05\).*--overwrite true"):
        train_irn.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), irn_learning_rate=0.05))
    cam_to_ir_label.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), conf_bg_thres=0.05))
    with pytest.raises(WSSSError, match="ir_labels changed"):
        train_irn.run(args)
    assert w.stat().st_mtime_ns == t
    # an interrupted training made from other inputs is not resumed
    resume = w.with_name(w.name + ".resume")
    resume.write_bytes(b"")
    with pytest.raises(WSSSError, match="interrupted training .* other inputs"):
        train_irn.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), overwrite=True, resume=True,
                                irn_num_epoches=2))
    resume.unlink()
    cam_to_ir_label.run(args)
    train_irn.run(args)  # the labels are those of the weights' record again: skipped
    assert w.stat().st_mtime_ns == t

    # pseudo-labels: reused while the weights and settings match, recomputed when beta changes
    make_sem_seg_labels.run(args)
    sem = _mtimes(out / "sem_seg", "*.png")
    make_sem_seg_labels.run(args)
    assert _mtimes(out / "sem_seg", "*.png") == sem
    capsys.readouterr()
    make_sem_seg_labels.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), beta=8))
    assert "make_sem_seg_labels: beta changed (10 -> 8)" in capsys.readouterr().out
    assert all(v != sem[k] for k, v in _mtimes(out / "sem_seg", "*.png").items())
    rec = read_record(out / "score" / RECORD_NAME)
    assert rec["state"] == "complete" and rec["settings"]["beta"] == 8

    # training killed after its first epoch: the rerun refuses nothing, --resume continues it
    w2 = tmp_path / "sess2" / "res50_irn.pth"
    args2 = _irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), irn_num_epoches=2, irn_weights_name=str(w2))
    real_save, saves = train_irn.save_training_state, []

    def killed(path, state, *a, **k):  # the resume state of epoch 1 is saved, epoch 2 is interrupted
        if len(saves) == 1:
            raise KeyboardInterrupt
        saves.append(path)
        return real_save(path, state, *a, **k)

    monkeypatch.setattr(train_irn, "save_training_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train_irn.run(args2)
    monkeypatch.setattr(train_irn, "save_training_state", real_save)
    assert not w2.exists() and read_record(record_path_for(w2, is_dir=False))["state"] == "running"
    capsys.readouterr()
    train_irn.run(_irn_args(voc, out, ck1, lst, cam_scales=(1.0, 0.5), irn_num_epoches=2, irn_weights_name=str(w2),
                            resume=True))
    assert "resumed from" in capsys.readouterr().out and w2.is_file()
    assert read_record(record_path_for(w2, is_dir=False))["state"] == "complete"


# ----------------------------------------------------------------------------------------------
# interrupted, then rerun: the same files as one uninterrupted run (cam_to_ir_label, make_sem_seg_labels,
# BECO test.py)


def _stop_after(n: int, real, made: list):
    """A writer that raises KeyboardInterrupt (as Ctrl-C would) once ``n`` outputs are written."""
    def write(path, *a, **k):
        if len(made) == n:
            raise KeyboardInterrupt
        real(path, *a, **k)
        made.append(path)
    return write


def _same_bytes(a: Path, b: Path, pattern: str) -> None:
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.parametrize("workers", [1, 2])
def test_cam_to_ir_label_interrupted_then_rerun(infer_setup, tmp_path, capsys, monkeypatch, one_thread, workers):
    pytest.importorskip("pydensecrf.densecrf")
    from irn.steps import cam_to_ir_label, make_cam

    work, voc, ids, (ck0, _) = infer_setup
    out, ref = tmp_path / "irn", tmp_path / "ref"
    args = _irn_args(voc, out, ck0, work / "four.txt", num_workers=workers)
    make_cam.run(args)
    ref_args = _irn_args(voc, ref, ck0, work / "four.txt", cam_out_dir=str(out / "cam"), num_workers=1)
    cam_to_ir_label.run(ref_args)  # uninterrupted, one process
    made: list = []
    if workers == 1:
        monkeypatch.setattr(cam_to_ir_label, "save_png", _stop_after(2, cam_to_ir_label.save_png, made))
    else:
        # Ctrl-C reaches the parent while the pool works: stop after 2 results have come back
        real_tqdm = cam_to_ir_label.tqdm

        def stopping(it, **k):
            for x in real_tqdm(it, **k):
                if len(made) == 2:
                    raise KeyboardInterrupt
                made.append(x)
                yield x
        monkeypatch.setattr(cam_to_ir_label, "tqdm", stopping)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        cam_to_ir_label.run(args)
    monkeypatch.undo()
    irl = out / "ir_label"
    assert read_record(irl / RECORD_NAME)["state"] == "running"
    kept = _mtimes(irl, "*.png")
    assert len(kept) >= 2  # a worker may have finished one more before the pool was stopped
    cam_to_ir_label.run(args)
    assert f"cam_to_ir_label: {len(ids) - len(kept)} of {len(ids)} images to do" in capsys.readouterr().out
    assert {k: v for k, v in _mtimes(irl, "*.png").items() if k in kept} == kept  # finished files kept
    assert read_record(irl / RECORD_NAME)["state"] == "complete"
    _same_bytes(irl, ref / "ir_label", "*.png")


def test_make_sem_seg_labels_interrupted_then_rerun(infer_setup, tmp_path, capsys, monkeypatch, one_thread):
    from irn.net.resnet50_irn import EdgeDisplacement
    from irn.steps import make_cam, make_sem_seg_labels

    work, voc, ids, (ck0, _) = infer_setup
    out, ref = tmp_path / "irn", tmp_path / "ref"
    args = _irn_args(voc, out, ck0, work / "four.txt")
    make_cam.run(args)
    torch.manual_seed(0)  # untrained IRN weights: the random walk only has to be the same in both runs
    Path(args.irn_weights_name).parent.mkdir(parents=True)
    torch.save(EdgeDisplacement(crop_size=96, stride=4, backbone_width=8).state_dict(), args.irn_weights_name)
    make_sem_seg_labels.run(_irn_args(voc, ref, ck0, work / "four.txt", cam_out_dir=args.cam_out_dir,
                                      irn_weights_name=args.irn_weights_name))
    made: list = []
    # the score file of the third image is written, its pseudo-label is not: both are redone
    monkeypatch.setattr(make_sem_seg_labels, "save_png", _stop_after(2, make_sem_seg_labels.save_png, made))
    with pytest.raises(KeyboardInterrupt):
        make_sem_seg_labels.run(args)
    monkeypatch.undo()
    sem, score = out / "sem_seg", out / "score"
    assert len(list(sem.glob("*.png"))) == 2 and len(list(score.glob("*.pt"))) == 3
    assert read_record(sem / RECORD_NAME)["state"] == read_record(score / RECORD_NAME)["state"] == "running"
    kept = _mtimes(sem, "*.png")
    capsys.readouterr()
    make_sem_seg_labels.run(args)
    assert f"make_sem_seg_labels: {len(ids) - 2} of {len(ids)} images to do" in capsys.readouterr().out
    assert {k: v for k, v in _mtimes(sem, "*.png").items() if k in kept} == kept
    _same_bytes(sem, ref / "sem_seg", "*.png")
    for i in ids:
        a, b = torch.load(score / f"{i}.pt", weights_only=False), torch.load(ref / "score" / f"{i}.pt", weights_only=False)
        assert np.array_equal(a["pred"], b["pred"]) and np.array_equal(a["keys"], b["keys"])
        torch.testing.assert_close(a["score"], b["score"], rtol=0, atol=0, equal_nan=True)  # untrained: NaN rows
    assert read_record(sem / RECORD_NAME)["state"] == read_record(score / RECORD_NAME)["state"] == "complete"


def test_beco_test_interrupted_then_rerun(toy_voc, tmp_path, capsys, monkeypatch):
    import shutil

    test_py, ids, lst, logits, _ = _beco_logits(toy_voc, tmp_path, 4)
    shutil.copytree(logits, tmp_path / "ref" / "logits_msc")

    def argv(folder: Path) -> list[str]:
        return ["--logits_dir", str(folder), "--data_root", str(toy_voc), "--list", str(lst), "--n-jobs", "1",
                "--label_folder", "SegmentationClass"]

    assert test_py.main(argv(tmp_path / "ref" / "logits_msc")) == 0
    ref_miou = [x for x in capsys.readouterr().out.splitlines() if x.startswith("mIoU")]
    made: list = []
    monkeypatch.setattr(test_py, "write_label_png", _stop_after(2, test_py.write_label_png, made))
    assert test_py.main(argv(logits)) == 130
    monkeypatch.undo()
    pred = tmp_path / "tag" / "val_pred"
    kept = _mtimes(pred, "*.png")
    assert len(kept) == 2 and read_record(pred / RECORD_NAME)["state"] == "running"
    capsys.readouterr()
    assert test_py.main(argv(logits)) == 0
    assert [x for x in capsys.readouterr().out.splitlines() if x.startswith("mIoU")] == ref_miou
    assert {k: v for k, v in _mtimes(pred, "*.png").items() if k in kept} == kept
    assert read_record(pred / RECORD_NAME)["state"] == "complete"
    _same_bytes(pred, tmp_path / "ref" / "val_pred", "*.png")
