"""Fault and bad-input probe: every command-line entry point run as a real subprocess on the toy set.

Not part of the test suite (it trains tiny models and starts ~90 processes: several minutes on 2 cores).
Each case states what a user must see: the exit status, exactly one ``error:`` / ``interrupted:`` line
(or an argparse usage error), no ``Traceback`` on stderr, no marker file left by a crafted pickle, and
outputs that are still intact. The script prints a table (case, expected, got, PASS/FAIL) and writes
``bench/results/probe_errors.json``.

    OMP_NUM_THREADS=1 python bench/probe_errors.py [--work DIR] [--only SUBSTR] [--keep]

Categories: ``pickle`` (crafted pickles/checkpoints), ``missing`` (files and folders), ``readonly``
(a read-only output folder; root needs a private mount namespace, skipped where there is none),
``flags`` (bad values), ``content`` (wrong or corrupt inputs), ``sigint`` (Ctrl-C to the process group),
``rerun`` (what a second run does).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------------------------
# Crafted pickles: loading one must not create the marker file.
# ----------------------------------------------------------------------------------------------

class _Evil:
    """Unpickling calls ``os.system('touch <marker>')``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_npy(path: Path, marker: Path, wrap: Callable[[object], object] = lambda x: x) -> None:
    """An ``np.save``-format file whose object payload runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty((), dtype=object)
    arr[()] = wrap(_Evil(marker))
    np.save(path, arr, allow_pickle=True)


def evil_torch(path: Path, marker: Path, key: str = "model") -> None:
    """A torch-format file (zip + pickle) whose payload runs code under ``weights_only=False``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: _Evil(marker), "epoch": 1}, path)


def evil_legacy(path: Path, marker: Path) -> None:
    """A plain pickle (the pre-zip torch format) that runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    category: str
    argv: list[str]
    expect: str = "error"  # error | usage | ok | interrupt | error_or_ok | error_or_usage
    cwd: Path = ROOT
    setup: Callable[[], None] | None = None
    check: Callable[[subprocess.CompletedProcess], str | None] | None = None  # None = fine, else why not
    sigint_after: float = 0.0  # > 0: SIGINT to the process group after this many seconds
    wrapper: list[str] = field(default_factory=list)  # e.g. unshare + mount
    timeout: float = 600.0
    marker: Path | None = None
    contains: str | None = None  # a substring the error line must hold (the file it names)
    skip: str | None = None

    def expected(self) -> str:
        return {"error": "exit 2, one error: line", "usage": "exit 2, usage error",
                "ok": "exit 0, no traceback", "interrupt": "exit 130, one interrupted: line",
                "error_or_ok": "exit 0 or one error: line",
                "error_or_usage": "exit 2, usage or one error: line"}[self.expect] + (
            f" naming {self.contains!r}" if self.contains else "")


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


def run_case(c: Case) -> tuple[str, str, float]:
    """Runs one case; returns (verdict PASS/FAIL/SKIP, what happened, seconds)."""
    if c.skip:
        return "SKIP", c.skip, 0.0
    if c.marker is not None and c.marker.exists():
        c.marker.unlink()
    if c.setup is not None:
        c.setup()
    t0 = time.time()
    cmd = c.wrapper + [PY] + c.argv if c.wrapper and not c.wrapper[-1].endswith("{cmd}") else [PY] + c.argv
    if c.wrapper and c.wrapper[-1].endswith("{cmd}"):
        inner = " ".join(f"'{x}'" for x in [PY] + c.argv)
        cmd = c.wrapper[:-1] + [c.wrapper[-1].replace("{cmd}", "exec " + inner)]
    proc = subprocess.Popen(cmd, cwd=c.cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if c.sigint_after > 0:
            try:
                out, err = proc.communicate(timeout=c.sigint_after)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                out, err = proc.communicate(timeout=c.timeout)
        else:
            out, err = proc.communicate(timeout=c.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return "FAIL", f"timeout after {c.timeout:.0f}s", time.time() - t0
    dt = time.time() - t0
    rc = proc.returncode
    lines = _lines(err)
    # warnings (a de-duplicated list, a checkpoint that is not the known one) are fine beside the error
    errs = [x for x in lines if x.startswith(("error:", "interrupted:"))]
    problems = []
    if "Traceback" in err:
        tail = [x for x in lines if x and not x.startswith(" ")][-1:] or ["?"]
        problems.append(f"traceback ({tail[0][:160]})")
    if c.marker is not None and c.marker.exists():
        problems.append("MARKER CREATED: code ran")
    got = f"exit {rc}"
    if c.expect == "error_or_usage":
        c_expect = "usage" if "usage:" in err else "error"
    else:
        c_expect = c.expect
    if c_expect == "error" or (c_expect == "error_or_ok" and rc != 0):
        if rc != 2:
            problems.append(f"exit {rc} (want 2)")
        if len(errs) != 1 or not errs[0].startswith("error:"):
            problems.append(f"{len(errs)} error lines")
        elif lines[-1] != errs[0]:
            problems.append(f"more stderr after the error line: {lines[-1][:80]!r}")
        elif c.contains and c.contains not in errs[0]:
            problems.append(f"error does not name {c.contains!r}")
        got += ": " + (errs[0][:150] if errs else (lines[-1][:150] if lines else "(no stderr)"))
    elif c_expect == "usage":
        if rc != 2 or "usage:" not in err:
            problems.append(f"not a usage error (exit {rc})")
        got += ": " + (lines[-1][:150] if lines else "(no stderr)")
    elif c_expect in ("ok", "error_or_ok"):
        if rc != 0:
            problems.append(f"exit {rc} (want 0)")
        got += (": " + lines[-1][:150]) if rc != 0 and lines else ""
    elif c_expect == "interrupt":
        if rc != 130:
            problems.append(f"exit {rc} (want 130)")
        if errs != ["interrupted: stopped by Ctrl-C"] and (len(errs) != 1 or not errs[0].startswith("interrupted:")):
            problems.append(f"{len(errs)} interrupted/error lines")
        got += ": " + (errs[0][:150] if errs else (lines[-1][:150] if lines else "(no stderr)"))
    if c.check is not None and not problems:
        why = c.check(subprocess.CompletedProcess(cmd, rc, out, err))
        if why:
            problems.append(why)
    if problems:
        return "FAIL", got + " | " + "; ".join(problems), dt
    return "PASS", got, dt


# ----------------------------------------------------------------------------------------------
# The world every case starts from: a toy set and tiny outputs of every stage.
# ----------------------------------------------------------------------------------------------

def sh(argv: list[str], cwd: Path = ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs a setup command; stops the probe when it fails (the setup must work)."""
    p = subprocess.run([PY] + argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"setup failed: {' '.join(argv)}\n{p.stderr[-3000:]}")
    return p


class World:
    """Paths of the toy set and of the tiny outputs of each stage under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        self.voc = work / "toy"
        self.lists = self.voc / "lists"
        self.cls = self.lists / "cls_labels.npy"
        self.train_list = self.lists / "train_aug.txt"
        self.seed_list = self.lists / "train.txt"
        self.val_list = self.lists / "val.txt"
        self.exp = work / "exp"
        self.name = "p"
        self.ckpt = self.exp / self.name / "ckpt" / "001net_main.pth"
        self.dict = self.exp / self.name / "dict"
        self.irn = work / "irn"
        self.beco = work / "beco"
        self.marker = work / "MARKER"
        self.name2 = "q"  # a second checkpoint (another seed) for the rerun cases
        self.ckpt2 = self.exp / self.name2 / "ckpt" / "001net_main.pth"

    # common argument blocks -------------------------------------------------------------------
    def train_args(self, name: str = "t", **over: str) -> list[str]:
        a = {"--name": name, "--exp_root": str(self.exp), "--data_root": str(self.voc),
             "--train_list": str(self.train_list), "--cls_labels": str(self.cls), "--init": "none",
             "--width": "0.125", "--max_epochs": "2", "--T": "1", "--batch_size": "4",
             "--early_batch_size": "4", "--crop": "64", "--resize": "64 96", "--val_epochs": "none",
             "--epoch_iters": "2", "--workers": "0", "--threads": "1", "--device": "cpu"}
        a.update(over)
        return _flat(a)

    def infer_args(self, name: str | None = None, **over: str) -> list[str]:
        a = {"--name": name or self.name, "--exp_root": str(self.exp), "--load_epo": "1", "--dict": None,
             "--infer_list": str(self.seed_list), "--data_root": str(self.voc), "--cls_labels": str(self.cls),
             "--workers": "0", "--threads": "1", "--device": "cpu", "--scales": "1.0", "--no_progress": None}
        if name not in (None, self.name) and "--ckpt" not in over:
            a["--ckpt"] = str(self.ckpt)  # another experiment name: same checkpoint
        a.update(over)
        return _flat(a)

    def eval_args(self, **over: str) -> list[str]:
        a = {"--name": self.name, "--exp_root": str(self.exp), "--task": "cam", "--dict_dir": "dict",
             "--data_root": str(self.voc), "--list": "train", "--workers": "1", "--no_plot": None,
             "--no_progress": None, "--out_json": str(self.work / "eval_out" / "e.json")}
        a.update(over)
        return _flat(a)

    def irn_args(self, out: Path | None = None, **over: str) -> list[str]:
        o = out or self.irn
        a = {"--voc12_root": str(self.voc), "--train_list": str(self.seed_list), "--infer_list": str(self.seed_list),
             "--eval_list": str(self.seed_list),
             "--cls_labels": str(self.cls), "--cam_weights_name": str(self.ckpt)[:-4],
             "--cam_out_dir": str(o / "cam"), "--ir_label_out_dir": str(o / "ir_label"),
             "--sem_seg_out_dir": str(o / "sem_seg"), "--score_dir": str(o / "score"),
             "--ins_seg_out_dir": str(o / "ins_seg"), "--irn_weights_name": str(o / "irn.pth"),
             "--irn_crop_size": "96", "--irn_batch_size": "4", "--irn_num_epoches": "1",
             "--irn_backbone_width": "8", "--irn_backbone_init": "none", "--num_workers": "1",
             "--cam_scales": "(1.0,)", "--device": "cpu", "--quiet": "true", "--log_name": str(o / "log"),
             "--eval_cam_pass": "false", "--eval_sem_seg_pass": "false"}
        a.update(over)
        return _flat(a)

    def gen_mask_args(self, **over: str) -> list[str]:
        a = {"--score_dir": str(self.irn / "score"), "--mask_out_dir": str(self.work / "mask"), "--num_workers": "1"}
        a.update(over)
        return _flat(a)

    def beco_args(self, tag: str = "seg", base: Path | None = None, **over: str) -> list[str]:
        a = {"--logging_tag": tag, "--config": "configs/toy.json", "--logging_path_base": str(base or self.beco),
             "--data_root": str(self.voc), "--sem_seg_dir": str(self.irn / "sem_seg"),
             "--mask_dir": str(self.work / "mask"), "--train_list": str(self.seed_list),
             "--val_list": str(self.val_list), "--backbone_width": "8", "--max_epoch": "1", "--batch_size": "4",
             "--crop_size": "64", "--val_size": "80", "--device": "cpu", "--threads": "1", "--num_workers": "0",
             "--msc_scales": "1.0"}
        a.update(over)
        return _flat(a)

    def seg_test_args(self, **over: str) -> list[str]:
        a = {"--logits_dir": str(self.beco / "seg" / "logits_msc"), "--mode": "val", "--n-jobs": "1",
             "--data_root": str(self.voc), "--list": str(self.val_list)}
        a.update(over)
        return _flat(a)

    def build(self) -> None:
        t0 = time.time()
        sh(["-m", "voc12.toy", "--out", str(self.voc), "--n_train", "12", "--n_val", "6", "--max_size", "96"])
        sh(["voc12/prepare.py", "--voc_root", str(self.voc), "--out_dir", str(self.lists)])
        sh(["train.py"] + self.train_args(self.name))
        sh(["infer.py"] + self.infer_args())
        sh(["run_sample.py"] + self.irn_args(), cwd=ROOT / "irn")
        sh(["gen_mask.py"] + self.gen_mask_args(), cwd=ROOT / "irn")
        sh(["main.py"] + self.beco_args(), cwd=ROOT / "segmentation")
        print(f"world built in {time.time() - t0:.0f}s under {self.work}", flush=True)


def _flat(a: dict) -> list[str]:
    out: list[str] = []
    for k, v in a.items():
        if v is False:
            continue
        out.append(k)
        if v is not None:
            out.extend(str(v).split(" ") if k in ("--resize", "--scales", "--crop", "--alphas", "--msc_scales")
                       else [str(v)])
    return out


# ----------------------------------------------------------------------------------------------
# Helpers for the cases
# ----------------------------------------------------------------------------------------------

def fresh_copy(src: Path, dst: Path) -> Path:
    """``dst`` as a fresh copy of ``src`` (times kept, so provenance records still match)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def first(folder: Path, pattern: str = "*.npy") -> Path:
    return sorted(folder.glob(pattern))[0]


def digest_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of every file under ``folder``: "outputs intact" compares these."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unchanged(folder: Path) -> Callable[[subprocess.CompletedProcess], str | None]:
    """A check: ``folder`` is exactly as it was before the case ran (snapshot taken at construction)."""
    state: dict = {}

    def snap() -> None:
        state["before"] = digest_tree(folder)

    def check(_p) -> str | None:
        after = digest_tree(folder)
        if after != state["before"]:
            changed = sorted(set(after.items()) ^ set(state["before"].items()))
            return f"outputs changed under {folder.name}: {changed[:2]}"
        return None

    check.snap = snap  # type: ignore[attr-defined]
    return check


def ro_wrapper(folder: Path) -> tuple[list[str], str | None]:
    """(wrapper, skip reason): run the command with ``folder`` bind-mounted read-only in a private mount
    namespace (root ignores chmod); non-root: chmod is enough, and the wrapper only execs."""
    if os.geteuid() != 0:
        return ["sh", "-c", f"chmod a-w '{folder}' && {{cmd}}"], None
    if shutil.which("unshare") is None:
        return [], "no unshare: a read-only folder cannot be made for root"
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt 2>&1 || true; true"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return [], f"no private mount namespace here: {p.stderr.strip()[:100]}"
    return ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && {{cmd}}"], None


def write_list(path: Path, ids: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join(i + "\n" for i in ids), encoding="utf-8")
    return path


def ids_of(lst: Path) -> list[str]:
    """Image ids of a list file (plain ids or ``/JPEGImages/<id>.jpg ...`` lines)."""
    return [Path(x.split()[0]).stem for x in lst.read_text().splitlines() if x.strip()]


def _builder(w: World) -> tuple[list[Case], Path, Callable[..., Case], list[str]]:
    """(the case list, the scratch folder with one subfolder per case, ``add(name, category, argv,
    expect="error", **Case fields)`` appending to that list, the toy seed-list ids)."""
    C: list[Case] = []

    def add(name: str, cat: str, argv: list[str], expect: str = "error", **kw) -> Case:
        c = Case(name, cat, argv, expect, **kw)
        C.append(c)
        return c
    return C, w.work / "c", add, ids_of(w.seed_list)


def cases(w: World) -> list[Case]:
    C, box, add, ids = _builder(w)
    M = w.marker
    IRN, SEG = ROOT / "irn", ROOT / "segmentation"


    def d(name: str) -> Path:
        p = box / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def exp_copy(name: str) -> Path:
        """A copy of the finished stage-one experiment as experiments/<name>."""
        return fresh_copy(w.exp / w.name, w.exp / name)

    # ---------------------------------------------------------------- pickle: crafted files run no code
    ck = box / "evil" / "zip.pth"
    ck_legacy = box / "evil" / "legacy.pth"
    evil_cls = box / "evil" / "cls_labels.npy"

    def mk_evil():
        evil_torch(ck, M)
        evil_legacy(ck_legacy, M)
        evil_npy(evil_cls, M)

    mk_evil()
    add("infer_evil_ckpt", "pickle", ["infer.py"] + w.infer_args("ev1", **{"--ckpt": str(ck)}), marker=M,
        contains=str(ck))
    add("infer_evil_legacy_ckpt", "pickle", ["infer.py"] + w.infer_args("ev2", **{"--ckpt": str(ck_legacy)}),
        marker=M, contains=str(ck_legacy))
    add("infer_evil_cls_labels", "pickle", ["infer.py"] + w.infer_args("ev3", **{"--cls_labels": str(evil_cls)}),
        marker=M, contains=str(evil_cls))
    add("train_evil_cls_labels", "pickle", ["train.py"] + w.train_args("ev4", **{"--cls_labels": str(evil_cls)}),
        marker=M, contains=str(evil_cls))

    def ev_dict(name, wrap=lambda x: x):
        def f():
            e = exp_copy(name)
            evil_npy(first(e / "dict"), M, wrap)
        return f
    add("eval_cam_evil_dict", "pickle", ["evaluation.py"] + w.eval_args(**{"--name": "ev5"}), marker=M,
        setup=ev_dict("ev5"), contains="dict")
    add("eval_cam_evil_in_dict_value", "pickle", ["evaluation.py"] + w.eval_args(**{"--name": "ev6"}), marker=M,
        setup=ev_dict("ev6", lambda x: {3: x}), contains="dict")
    add("eval_crf_evil_dict", "pickle", ["evaluation.py"] + w.eval_args(**{"--name": "ev7", "--task": "crf"}),
        marker=M, setup=ev_dict("ev7"), contains="dict")

    def ev_resume():
        e = exp_copy("ev8")
        evil_torch(e / "ckpt" / "last.pth", M, key="model")
    add("train_resume_evil_last", "pickle", ["train.py"] + w.train_args("ev8", **{"--resume": None}), marker=M,
        setup=ev_resume, contains="last.pth")

    def ev_irn(name, fn):
        def f():
            o = fresh_copy(w.irn, box / name)
            fn(o)
        return f
    add("irn_evil_cam_file", "pickle",
        ["run_sample.py"] + w.irn_args(box / "ev9", **{"--make_cam_pass": "false", "--train_irn_pass": "false",
                                                       "--make_sem_seg_pass": "false", "--overwrite": "true"}),
        cwd=IRN, marker=M, setup=ev_irn("ev9", lambda o: evil_npy(first(o / "cam"), M)), contains="cam")
    add("irn_evil_cam_weights", "pickle",
        ["run_sample.py"] + w.irn_args(box / "ev10", **{"--cam_weights_name": str(ck)[:-4], "--overwrite": "true"}),
        cwd=IRN, marker=M, contains=str(ck))
    add("irn_evil_irn_weights", "pickle",
        ["run_sample.py"] + w.irn_args(box / "ev11", **{"--make_cam_pass": "false", "--cam_to_ir_label_pass": "false",
                                                        "--train_irn_pass": "false", "--overwrite": "true"}),
        cwd=IRN, marker=M, setup=ev_irn("ev11", lambda o: evil_torch(o / "irn.pth", M)), contains="irn.pth")
    add("irn_evil_cls_labels", "pickle",
        ["run_sample.py"] + w.irn_args(box / "ev12", **{"--cls_labels": str(evil_cls), "--overwrite": "true"}),
        cwd=IRN, marker=M, contains=str(evil_cls))

    def ev_score():
        o = fresh_copy(w.irn / "score", box / "ev13" / "score")
        evil_torch(first(o, "*.pt"), M, key="pred")
    add("gen_mask_evil_score", "pickle",
        ["gen_mask.py"] + w.gen_mask_args(**{"--score_dir": str(box / "ev13" / "score"),
                                             "--mask_out_dir": str(box / "ev13" / "mask")}),
        cwd=IRN, marker=M, setup=ev_score, contains="score")
    add("beco_test_evil_ckpt", "pickle", ["main.py"] + w.beco_args("ev14", **{"--test": None, "--ckpt": str(ck)}),
        cwd=SEG, marker=M, contains=str(ck))
    add("beco_train_from_evil_ckpt", "pickle", ["main.py"] + w.beco_args("ev15", **{"--ckpt": str(ck_legacy)}),
        cwd=SEG, marker=M, contains=str(ck_legacy))

    def ev_logits():
        o = fresh_copy(w.beco / "seg" / "logits_msc", box / "ev16" / "logits")
        evil_npy(first(o), M)
    add("seg_test_evil_logits", "pickle",
        ["test.py"] + w.seg_test_args(**{"--logits_dir": str(box / "ev16" / "logits")}), cwd=SEG, marker=M,
        setup=ev_logits, contains="logits")

    def ev_resume_beco():
        o = fresh_copy(w.beco / "seg", box / "ev17" / "seg")
        evil_torch(o / "ckpt_epoch_1.pth", M)
    add("beco_resume_evil_ckpt", "pickle",
        ["main.py"] + w.beco_args("seg", box / "ev17", **{"--resume": None, "--max_epoch": "2"}), cwd=SEG, marker=M,
        setup=ev_resume_beco, contains="ckpt_epoch_1.pth")

    # ---------------------------------------------------------------- missing files and folders
    nope = w.work / "does_not_exist"
    add("train_missing_data_root", "missing", ["train.py"] + w.train_args("m1", **{"--data_root": str(nope)}),
        contains=str(nope))
    add("train_missing_list", "missing", ["train.py"] + w.train_args("m2", **{"--train_list": str(nope / "l.txt")}),
        contains="l.txt")
    add("train_missing_cls_labels", "missing",
        ["train.py"] + w.train_args("m3", **{"--cls_labels": str(nope / "c.npy")}), contains="c.npy")
    add("train_missing_init", "missing", ["train.py"] + w.train_args("m4", **{"--init": str(nope / "i.params")}),
        contains="i.params")
    add("infer_missing_epoch_ckpt", "missing", ["infer.py"] + w.infer_args(**{"--load_epo": "7"}),
        contains="007net_main.pth")
    add("infer_missing_ckpt_path", "missing", ["infer.py"] + w.infer_args(**{"--ckpt": str(nope / "x.pth")}),
        contains="x.pth")
    add("infer_missing_list", "missing", ["infer.py"] + w.infer_args(**{"--infer_list": str(nope / "l.txt")}),
        contains="l.txt")
    lst_extra = write_list(box / "m8" / "list.txt", ids_of(w.seed_list)[:2] + ["2999_999999"])
    add("infer_image_missing", "missing", ["infer.py"] + w.infer_args("m8", **{"--infer_list": str(lst_extra)}),
        contains="2999_999999")
    add("eval_missing_dict_dir", "missing", ["evaluation.py"] + w.eval_args(**{"--dict_dir": "nope"}),
        contains="nope")
    add("eval_missing_gt_dir", "missing", ["evaluation.py"] + w.eval_args(**{"--gt_dir": str(nope)}),
        contains=str(nope))
    add("eval_missing_list", "missing", ["evaluation.py"] + w.eval_args(**{"--list": str(nope / "l.txt")}),
        contains="l.txt")

    def m12():
        e = exp_copy("m12")
        first(e / "dict").unlink()
    add("eval_missing_one_prediction", "missing", ["evaluation.py"] + w.eval_args(**{"--name": "m12"}),
        setup=m12, contains="m12")
    add("irn_missing_voc_root", "missing", ["run_sample.py"] + w.irn_args(box / "m13", **{"--voc12_root": str(nope)}),
        cwd=IRN, contains=str(nope))
    add("irn_missing_cam_weights", "missing",
        ["run_sample.py"] + w.irn_args(box / "m14", **{"--cam_weights_name": str(nope / "w")}), cwd=IRN,
        contains="w")
    add("irn_sem_seg_without_weights", "missing",
        ["run_sample.py"] + w.irn_args(box / "m15", **{"--make_cam_pass": "false", "--cam_to_ir_label_pass": "false",
                                                       "--train_irn_pass": "false"}), cwd=IRN, contains="irn.pth")
    add("irn_missing_resnet50", "missing",
        ["run_sample.py"] + w.irn_args(box / "m16", **{"--irn_backbone_init": str(nope / "r50.pth"),
                                                       "--irn_backbone_width": "64"}), cwd=IRN, contains="r50.pth")
    add("gen_mask_missing_score_dir", "missing", ["gen_mask.py"] + w.gen_mask_args(**{"--score_dir": str(nope)}),
        cwd=IRN, contains=str(nope))
    add("beco_missing_sem_seg", "missing", ["main.py"] + w.beco_args("m18", **{"--sem_seg_dir": str(nope)}),
        cwd=SEG, contains=str(nope))
    add("beco_missing_mask_dir", "missing", ["main.py"] + w.beco_args("m19", **{"--mask_dir": str(nope)}),
        cwd=SEG, contains=str(nope))
    add("beco_test_missing_ckpt", "missing",
        ["main.py"] + w.beco_args("m20", **{"--test": None, "--ckpt": str(nope / "b.pth")}), cwd=SEG,
        contains="b.pth")
    add("beco_missing_pretrained", "missing",
        ["main.py"] + w.beco_args("m21", **{"--pretrained": str(nope / "r101.pth")}), cwd=SEG, contains="r101.pth")

    def m22():
        o = fresh_copy(w.irn / "sem_seg", box / "m22" / "sem_seg")
        first(o, "*.png").unlink()
    add("beco_one_pseudo_label_missing", "missing",
        ["main.py"] + w.beco_args("m22", box / "m22", **{"--sem_seg_dir": str(box / "m22" / "sem_seg")}), cwd=SEG,
        setup=m22, contains="sem_seg")
    add("seg_test_missing_logits_dir", "missing", ["test.py"] + w.seg_test_args(**{"--logits_dir": str(nope)}),
        cwd=SEG, contains=str(nope))
    add("seg_test_missing_data_root", "missing", ["test.py"] + w.seg_test_args(**{"--data_root": str(nope)}),
        cwd=SEG, contains=str(nope))
    add("prepare_missing_voc_root", "missing", ["voc12/prepare.py", "--voc_root", str(nope), "--out_dir",
                                                str(box / "m25")], contains=str(nope))
    add("prepare_no_imagesets", "missing", ["voc12/prepare.py", "--voc_root", str(d("m26")), "--out_dir",
                                            str(box / "m26" / "l")], contains="m26")
    add("coco_prepare_missing_root", "missing", ["coco14/prepare.py", "--coco_root", str(nope)], contains=str(nope))
    add("pipeline_voc_missing_data", "missing",
        ["run_pipeline.py", "--preset", "voc", "--data_root", str(nope), "--name", "probe_m28", "--quiet",
         "--no_report"], contains=str(nope))
    return C


def cases_more(w: World) -> list[Case]:
    C, box, add, ids = _builder(w)
    IRN, SEG = ROOT / "irn", ROOT / "segmentation"


    def d(name: str) -> Path:
        p = box / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    # ---------------------------------------------------------------- read-only output folders
    def ro(name, argv, folder: Path, cwd=ROOT):
        folder.mkdir(parents=True, exist_ok=True)
        wrap, skip = ro_wrapper(folder)
        add(name, "readonly", argv, cwd=cwd, wrapper=wrap, skip=skip, contains=str(folder))

    ro("train_readonly_exp_root", ["train.py"] + w.train_args("r1", **{"--exp_root": str(box / "r1")}), box / "r1")
    ro("infer_readonly_exp_root", ["infer.py"] + w.infer_args(**{"--exp_root": str(box / "r2"),
                                                                 "--ckpt": str(w.ckpt)}), box / "r2")
    ro("eval_readonly_out", ["evaluation.py"] + w.eval_args(**{"--out_json": str(box / "r3" / "e.json")}), box / "r3")
    ro("irn_readonly_out", ["run_sample.py"] + w.irn_args(box / "r4"), box / "r4", cwd=IRN)
    ro("gen_mask_readonly_out", ["gen_mask.py"] + w.gen_mask_args(**{"--mask_out_dir": str(box / "r5" / "m")}),
       box / "r5", cwd=IRN)
    ro("beco_readonly_logging_dir", ["main.py"] + w.beco_args("r6", box / "r6"), box / "r6", cwd=SEG)
    ro("prepare_readonly_out", ["voc12/prepare.py", "--voc_root", str(w.voc), "--out_dir", str(box / "r7")],
       box / "r7")
    ro("toy_readonly_out", ["-m", "voc12.toy", "--out", str(box / "r8" / "toy"), "--n_train", "2", "--n_val", "1",
                            "--max_size", "48"], box / "r8")
    ro("seg_test_readonly_logits", ["test.py"] + w.seg_test_args(**{"--logits_dir": str(box / "r9"),
                                                                    "--overwrite": None}), box / "r9", cwd=SEG)
    C[-1].setup = lambda: None
    # seg_test reads logits from the ro folder: give it the logits first (before the mount)
    shutil.copytree(w.beco / "seg" / "logits_msc", box / "r9", dirs_exist_ok=True)
    C[-1].expect = "error_or_ok"

    # ---------------------------------------------------------------- bad flag values (parse time)
    flags = [
        ("train_threads_neg", ["train.py"] + w.train_args("f", **{"--threads": "-1"})),
        ("train_alphas_neg", ["train.py"] + w.train_args("f", **{"--alphas": "-3"})),
        ("train_batch_zero", ["train.py"] + w.train_args("f", **{"--batch_size": "0"})),
        ("train_crop_not_mult8", ["train.py"] + w.train_args("f", **{"--crop": "63"})),
        ("train_max_epochs_zero", ["train.py"] + w.train_args("f", **{"--max_epochs": "0"})),
        ("train_device_tpu", ["train.py"] + w.train_args("f", **{"--device": "tpu"})),
        ("train_TH_out_of_range", ["train.py"] + w.train_args("f", **{"--TH": "1.5"})),
        ("train_lr_nan", ["train.py"] + w.train_args("f", **{"--lr": "nan"})),
        ("train_width_zero", ["train.py"] + w.train_args("f", **{"--width": "0"})),
        ("infer_scales_zero", ["infer.py"] + w.infer_args(**{"--scales": "0"})),
        ("infer_device_tpu", ["infer.py"] + w.infer_args(**{"--device": "tpu"})),
        ("infer_workers_neg", ["infer.py"] + w.infer_args(**{"--workers": "-1"})),
        ("infer_alphas_neg", ["infer.py"] + w.infer_args(**{"--alphas": "-3"})),
        ("eval_workers_neg", ["evaluation.py"] + w.eval_args(**{"--workers": "-2"})),
        ("irn_sem_seg_bg_thres_5", ["run_sample.py"] + w.irn_args(box / "f", **{"--sem_seg_bg_thres": "5"})),
        ("irn_conf_fg_neg", ["run_sample.py"] + w.irn_args(box / "f", **{"--conf_fg_thres": "-1"})),
        ("irn_batch_zero", ["run_sample.py"] + w.irn_args(box / "f", **{"--irn_batch_size": "0"})),
        ("irn_crop_too_small", ["run_sample.py"] + w.irn_args(box / "f", **{"--irn_crop_size": "64"})),
        ("irn_device_tpu", ["run_sample.py"] + w.irn_args(box / "f", **{"--device": "tpu"})),
        ("irn_cam_scales_zero", ["run_sample.py"] + w.irn_args(box / "f", **{"--cam_scales": "(0,)"})),
        ("irn_beta_neg", ["run_sample.py"] + w.irn_args(box / "f", **{"--beta": "-1"})),
        ("gen_mask_thd_1_5", ["gen_mask.py"] + w.gen_mask_args(**{"--thd": "1.5"})),
        ("gen_mask_workers_neg", ["gen_mask.py"] + w.gen_mask_args(**{"--num_workers": "-1"})),
        ("beco_batch_zero", ["main.py"] + w.beco_args("f", **{"--batch_size": "0"})),
        ("beco_backbone_vgg16", ["main.py"] + w.beco_args("f", **{"--backbone": "vgg16"})),
        ("beco_crop_neg", ["main.py"] + w.beco_args("f", **{"--crop_size": "-1"})),
        ("beco_device_tpu", ["main.py"] + w.beco_args("f", **{"--device": "tpu"})),
        ("beco_output_stride_4", ["main.py"] + w.beco_args("f", **{"--output_stride": "4"})),
        ("beco_mix_prob_2", ["main.py"] + w.beco_args("f", **{"--mix_prob": "2"})),
        ("seg_test_num_classes_zero", ["test.py"] + w.seg_test_args(**{"--num_classes": "0"})),
        ("toy_n_train_neg", ["-m", "voc12.toy", "--out", str(box / "f" / "t"), "--n_train", "-1"]),
        ("toy_max_size_zero", ["-m", "voc12.toy", "--out", str(box / "f" / "t"), "--max_size", "0"]),
        ("coco_prepare_workers_neg", ["coco14/prepare.py", "--coco_root", str(w.voc), "--workers", "-1"]),
        ("pipeline_threads_neg", ["run_pipeline.py", "--threads", "-1", "--dry_run"]),
        ("pipeline_bad_stage", ["run_pipeline.py", "--from", "nosuchstage", "--dry_run"]),
    ]
    for name, argv in flags:
        cwd = IRN if argv[0] in ("run_sample.py", "gen_mask.py") else SEG if argv[0] in ("main.py", "test.py") else ROOT
        # an unknown device may be refused by argparse or as a user error (exit 2 both)
        expect = "error_or_usage" if name.endswith(("_tpu", "_stage", "_mult8")) else "usage"
        add(name, "flags", argv, expect, cwd=cwd)
    add("train_model_unknown", "flags", ["train.py"] + w.train_args("f", **{"--model": "nope"}), "error_or_usage")
    add("infer_model_unknown", "flags", ["infer.py"] + w.infer_args(**{"--model": "nope"}), "error_or_usage")
    return C


def cases_content(w: World) -> list[Case]:
    from PIL import Image

    C, box, add, ids = _builder(w)
    IRN, SEG = ROOT / "irn", ROOT / "segmentation"


    def voc_copy(name: str) -> Path:
        return fresh_copy(w.voc, box / name / "voc")

    def exp_copy(name: str) -> Path:
        return fresh_copy(w.exp / w.name, w.exp / name)

    def dict_case(name: str, mutate: Callable[[dict], dict], task: str = "cam", contains: str | None = None):
        def f():
            e = exp_copy(name)
            p = first(e / "dict")
            dd = np.load(p, allow_pickle=True).item()
            np.save(p, mutate(dd), allow_pickle=True)
        add(f"eval_{name}", "content", ["evaluation.py"] + w.eval_args(**{"--name": name, "--task": task}),
            setup=f, contains=contains or name)

    # -- stage one: images, checkpoints, labels
    def ct1():
        v = voc_copy("ct1")
        p = v / "JPEGImages" / f"{ids[0]}.jpg"
        p.write_bytes(p.read_bytes()[:200])
    add("infer_truncated_image", "content",
        ["infer.py"] + w.infer_args("ct1", **{"--data_root": str(box / "ct1" / "voc")}), setup=ct1, contains=ids[0])

    def ct2():
        (box / "ct2").mkdir(parents=True, exist_ok=True)
        (box / "ct2" / "bad.pth").write_bytes(os.urandom(4096))
    add("infer_random_bytes_ckpt", "content", ["infer.py"] + w.infer_args("ct2", **{"--ckpt": str(box / "ct2" / "bad.pth")}),
        setup=ct2, contains="bad.pth")

    def ct3():
        (box / "ct3").mkdir(parents=True, exist_ok=True)
        (box / "ct3" / "trunc.pth").write_bytes(w.ckpt.read_bytes()[:5000])
    add("infer_truncated_ckpt", "content", ["infer.py"] + w.infer_args("ct3", **{"--ckpt": str(box / "ct3" / "trunc.pth")}),
        setup=ct3, contains="trunc.pth")
    add("infer_irn_weights_as_ckpt", "content", ["infer.py"] + w.infer_args("ct4", **{"--ckpt": str(w.irn / "irn.pth")}),
        contains="irn.pth")

    non_dict = box / "ct5" / "cls_labels.npy"
    non_dict.parent.mkdir(parents=True, exist_ok=True)
    np.save(non_dict, np.zeros((3, 20), np.float32))
    add("train_non_dict_cls_labels", "content", ["train.py"] + w.train_args("ct5", **{"--cls_labels": str(non_dict)}),
        contains=str(non_dict))
    add("infer_non_dict_cls_labels", "content", ["infer.py"] + w.infer_args("ct5", **{"--cls_labels": str(non_dict)}),
        contains=str(non_dict))
    add("irn_non_dict_cls_labels", "content",
        ["run_sample.py"] + w.irn_args(box / "ct5" / "irn", **{"--cls_labels": str(non_dict)}), cwd=IRN,
        contains=str(non_dict))
    short = box / "ct6" / "cls_labels.npy"
    short.parent.mkdir(parents=True, exist_ok=True)
    lab = np.load(w.cls, allow_pickle=True).item()
    np.save(short, {k: v[:19] for k, v in lab.items()}, allow_pickle=True)
    add("infer_cls_labels_19_classes", "content", ["infer.py"] + w.infer_args("ct6", **{"--cls_labels": str(short)}),
        contains=str(short))
    missing_id = box / "ct7" / "cls_labels.npy"
    missing_id.parent.mkdir(parents=True, exist_ok=True)
    np.save(missing_id, {k: v for k, v in lab.items() if k != ids[1]}, allow_pickle=True)
    add("infer_id_missing_from_cls_labels", "content",
        ["infer.py"] + w.infer_args("ct7", **{"--cls_labels": str(missing_id)}), contains=ids[1])
    empty = write_list(box / "ct8" / "empty.txt", [])
    add("infer_empty_list", "content", ["infer.py"] + w.infer_args("ct8", **{"--infer_list": str(empty)}),
        contains=str(empty))
    add("train_empty_list", "content", ["train.py"] + w.train_args("ct8", **{"--train_list": str(empty)}),
        contains=str(empty))
    add("eval_empty_list", "content", ["evaluation.py"] + w.eval_args(**{"--list": str(empty)}), contains=str(empty))
    add("irn_empty_list", "content",
        ["run_sample.py"] + w.irn_args(box / "ct8" / "irn", **{"--infer_list": str(empty), "--train_list": str(empty)}),
        cwd=IRN, contains=str(empty))

    bom = write_list(box / "ct9" / "bom.txt", ids[:2], bom=True)
    add("infer_list_with_bom", "content", ["infer.py"] + w.infer_args("ct9", **{"--infer_list": str(bom)}), "ok",
        check=lambda p: None if (w.exp / "ct9" / "dict" / f"{ids[0]}.npy").exists()
        else f"no dict for {ids[0]}: {sorted(x.name for x in (w.exp / 'ct9' / 'dict').glob('*'))[:3]}")
    dup = write_list(box / "ct10" / "dup.txt", [ids[0], ids[1], ids[0]])
    add("infer_duplicate_ids", "content", ["infer.py"] + w.infer_args("ct10", **{"--infer_list": str(dup)}), "ok",
        check=lambda p: None if "warning" in p.stderr.lower() else "no warning about the duplicate id")
    add("eval_duplicate_ids", "content", ["evaluation.py"] + w.eval_args(**{"--list": str(dup)}), "ok",
        check=lambda p: None if "warning" in p.stderr.lower() else "no warning about the duplicate id")

    def ct11():
        v = voc_copy("ct11")
        Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(v / "JPEGImages" / "tiny_1x1.jpg")
        labs = dict(lab)
        labs["tiny_1x1"] = np.eye(20, dtype=np.float32)[0]
        np.save(box / "ct11" / "cls.npy", labs, allow_pickle=True)
        write_list(box / "ct11" / "l.txt", [ids[0], "tiny_1x1"])
    add("infer_1x1_image_default_scales", "content",
        ["infer.py"] + w.infer_args("ct11", **{"--data_root": str(box / "ct11" / "voc"), "--cls_labels": str(box / "ct11" / "cls.npy"),
                                              "--infer_list": str(box / "ct11" / "l.txt"), "--scales": "0.5 1.0 1.5 2.0"}),
        "error_or_ok", setup=ct11, contains="tiny_1x1")

    # -- evaluation inputs
    def ct12():
        e = exp_copy("trunc_npy")
        p = first(e / "dict")
        p.write_bytes(p.read_bytes()[:100])
    add("eval_truncated_npy", "content", ["evaluation.py"] + w.eval_args(**{"--name": "trunc_npy"}), setup=ct12,
        contains="trunc_npy")
    dict_case("string_key", lambda dd: {str(k): v for k, v in dd.items()})
    dict_case("nan_cam", lambda dd: {k: np.full_like(v, np.nan) for k, v in dd.items()})
    dict_case("wrong_shape_cam", lambda dd: {k: v[:-3] for k, v in dd.items()})
    dict_case("cam_key_21", lambda dd: {21: v for v in dd.values()})
    dict_case("crf_no_bg_key", lambda dd: {k + 1: v for k, v in dd.items()}, task="crf")
    C[-1].expect = "error_or_ok"  # the reference scores such a dict too (no background class)
    dict_case("dict_not_a_dict", lambda dd: np.zeros((2, 2)))

    def gt16():
        v = voc_copy("ct13")
        p = v / "SegmentationClass" / f"{ids[0]}.png"
        a = np.array(Image.open(p)).astype(np.uint16)
        a[:4, :4] = 256
        Image.fromarray(a).save(p)
    add("eval_16bit_gt_over_255", "content",
        ["evaluation.py"] + w.eval_args(**{"--data_root": str(box / "ct13" / "voc")}), setup=gt16, contains=ids[0])

    def gt_garbage():
        v = voc_copy("ct14")
        (v / "SegmentationClass" / f"{ids[0]}.png").write_bytes(b"not a png")
    add("eval_gt_not_a_png", "content",
        ["evaluation.py"] + w.eval_args(**{"--data_root": str(box / "ct14" / "voc")}), setup=gt_garbage, contains=ids[0])

    # -- IRN
    def irn_cam(name, mutate):
        def f():
            o = fresh_copy(w.irn, box / name)
            p = o / "cam" / f"{ids[0]}.npy"
            dd = np.load(p, allow_pickle=True).item()
            np.save(p, mutate(dd), allow_pickle=True)
        add(f"irn_{name}", "content",
            ["run_sample.py"] + w.irn_args(box / name, **{"--make_cam_pass": "false", "--train_irn_pass": "false",
                                                          "--make_sem_seg_pass": "false", "--overwrite": "true"}),
            cwd=IRN, setup=f, contains=ids[0])
    irn_cam("wrong_shape_cam", lambda dd: dict(dd, high_res=dd["high_res"][:, :-5]))
    irn_cam("cam_missing_high_res", lambda dd: {k: v for k, v in dd.items() if k != "high_res"})
    irn_cam("cam_nan", lambda dd: dict(dd, high_res=np.full_like(dd["high_res"], np.nan)))

    def trunc_score():
        o = fresh_copy(w.irn / "score", box / "ct15" / "score")
        p = first(o, "*.pt")
        p.write_bytes(p.read_bytes()[:300])
    add("gen_mask_truncated_score", "content",
        ["gen_mask.py"] + w.gen_mask_args(**{"--score_dir": str(box / "ct15" / "score"), "--mask_out_dir": str(box / "ct15" / "m")}),
        cwd=IRN, setup=trunc_score, contains="score")

    # -- BECO
    def logits(name, mutate):
        def f():
            o = fresh_copy(w.beco / "seg" / "logits_msc", box / name / "logits")
            p = first(o)
            mutate(p)
        add(f"seg_test_{name}", "content", ["test.py"] + w.seg_test_args(**{"--logits_dir": str(box / name / "logits")}),
            cwd=SEG, setup=f, contains=name)
    logits("truncated_logits", lambda p: p.write_bytes(p.read_bytes()[:150]))
    logits("logits_20_channels", lambda p: np.save(p, np.load(p)[:20]))
    logits("logits_nan", lambda p: np.save(p, np.full_like(np.load(p), np.nan)))

    def pl16():
        o = fresh_copy(w.irn / "sem_seg", box / "ct16" / "sem_seg")
        p = o / f"{ids[0]}.png"
        a = np.array(Image.open(p)).astype(np.uint16)
        a[:4, :4] = 300
        Image.fromarray(a).save(p)
    add("beco_16bit_pseudo_label", "content",
        ["main.py"] + w.beco_args("ct16", box / "ct16", **{"--sem_seg_dir": str(box / "ct16" / "sem_seg")}), cwd=SEG,
        setup=pl16, contains=ids[0])
    badcfg = box / "ct17" / "bad.json"
    badcfg.parent.mkdir(parents=True, exist_ok=True)
    badcfg.write_text("{not json")
    add("beco_config_not_json", "content", ["main.py"] + w.beco_args("ct17", box / "ct17", **{"--config": str(badcfg)}),
        cwd=SEG, contains="bad.json")
    unk = box / "ct18" / "unk.json"
    unk.parent.mkdir(parents=True, exist_ok=True)
    unk.write_text('{"network": {"bakbone": "resnet18"}}')
    add("beco_config_unknown_key", "content", ["main.py"] + w.beco_args("ct18", box / "ct18", **{"--config": str(unk)}),
        cwd=SEG, contains="bakbone")
    add("toy_ok", "content", ["-m", "voc12.toy", "--out", str(box / "ct19" / "toy"), "--n_train", "2", "--n_val", "1",
                              "--max_size", "48"], "ok")
    return C


def cases_sigint_rerun(w: World) -> list[Case]:
    import torch

    C, box, add, ids = _builder(w)
    IRN, SEG = ROOT / "irn", ROOT / "segmentation"


    # ---------------------------------------------------------------- Ctrl-C (SIGINT to the group)
    big = w.work / "big"

    def big_set():
        if not (big / "lists" / "cls_labels.npy").exists():
            sh(["-m", "voc12.toy", "--out", str(big), "--n_train", "150", "--n_val", "40", "--max_size", "160"])
            sh(["voc12/prepare.py", "--voc_root", str(big), "--out_dir", str(big / "lists")])
    big_set()
    big_ids = ids_of(big / "lists" / "train.txt")
    rng = np.random.default_rng(0)
    bdict = w.exp / "bigexp" / "dict"
    bdict.mkdir(parents=True, exist_ok=True)
    for i in big_ids:
        h, wd = Image_size(big / "JPEGImages" / f"{i}.jpg")
        np.save(bdict / f"{i}.npy", {3: rng.random((h, wd), np.float32), 7: rng.random((h, wd), np.float32)},
                allow_pickle=True)
    blog = box / "s_logits"
    blog.mkdir(parents=True, exist_ok=True)
    for i in ids_of(big / "lists" / "val.txt"):
        np.save(blog / f"{i}.npy", rng.standard_normal((21, 20, 20)).astype(np.float32))

    add("train_sigint", "sigint", ["train.py"] + w.train_args("s1", **{"--max_epochs": "60", "--epoch_iters": "0",
                                                                      "--data_root": str(big),
                                                                      "--train_list": str(big / "lists" / "train_aug.txt"),
                                                                      "--cls_labels": str(big / "lists" / "cls_labels.npy")}),
        "interrupt", sigint_after=14)
    add("infer_sigint", "sigint", ["infer.py"] + w.infer_args("s2", **{"--ckpt": str(w.ckpt), "--data_root": str(big),
                                                                      "--infer_list": str(big / "lists" / "train_aug.txt"),
                                                                      "--cls_labels": str(big / "lists" / "cls_labels.npy"),
                                                                      "--scales": "0.5 1.0 1.5 2.0", "--crf": None}),
        "interrupt", sigint_after=12)
    add("eval_sigint", "sigint", ["evaluation.py"] + w.eval_args(**{"--name": "bigexp", "--data_root": str(big),
                                                                    "--list": str(big / "lists" / "train.txt")}),
        "interrupt", sigint_after=7,
        skip="evaluation of the toy set takes under a second: no step long enough to interrupt")
    add("irn_sigint", "sigint", ["run_sample.py"] + w.irn_args(box / "s4", **{
        "--voc12_root": str(big), "--train_list": str(big / "lists" / "train.txt"),
        "--infer_list": str(big / "lists" / "train.txt"), "--eval_list": str(big / "lists" / "train.txt"),
        "--cls_labels": str(big / "lists" / "cls_labels.npy"), "--cam_scales": "(1.0,0.5,1.5,2.0)"}),
        "interrupt", cwd=IRN, sigint_after=12)
    add("beco_sigint", "sigint", ["main.py"] + w.beco_args("s5", box / "s5", **{"--max_epoch": "50"}), "interrupt",
        cwd=SEG, sigint_after=14)
    add("seg_test_crf_sigint", "sigint", ["test.py", "--logits_dir", str(blog), "--crf", "--n-jobs", "1",
                                          "--data_root", str(big), "--list", str(big / "lists" / "val.txt")],
        "interrupt", cwd=SEG, sigint_after=4)
    add("toy_sigint", "sigint", ["-m", "voc12.toy", "--out", str(box / "s7" / "toy"), "--n_train", "5000",
                                 "--max_size", "300"], "interrupt", sigint_after=6)
    add("prepare_sigint_or_done", "sigint", ["voc12/prepare.py", "--voc_root", str(big), "--out_dir", str(box / "s8")],
        "error_or_ok")
    add("pipeline_sigint", "sigint", ["run_pipeline.py", "--preset", "toy", "--size", "tiny", "--name", "probe_sigint",
                                      "--data_root", str(box / "s9" / "toy"), "--quiet", "--no_report", "--workers", "1"],
        "interrupt", sigint_after=25)

    # each interrupted run starts from nothing (a rerun of the probe finds the last one's outputs)
    fresh = {"train_sigint": [w.exp / "s1"], "infer_sigint": [w.exp / "s2"], "irn_sigint": [box / "s4"],
             "beco_sigint": [box / "s5"], "toy_sigint": [box / "s7"], "prepare_sigint_or_done": [box / "s8"],
             "pipeline_sigint": [box / "s9", ROOT / "experiments" / "probe_sigint"]}
    for c in C:
        if c.name in fresh:
            c.setup = lambda paths=fresh[c.name]: [shutil.rmtree(x, ignore_errors=True) for x in paths] and None

    # ---------------------------------------------------------------- reruns
    add("train_second_run_refused", "rerun", ["train.py"] + w.train_args(w.name), contains="--resume",
        check=None)
    seg_unchanged = unchanged(w.beco / "seg")
    add("beco_second_run_refused", "rerun", ["main.py"] + w.beco_args("seg"), cwd=SEG, contains="--overwrite",
        setup=seg_unchanged.snap, check=seg_unchanged)

    def irn_changed():
        o = fresh_copy(w.irn, box / "rr1")
        sd = torch.load(o / "irn.pth", weights_only=True)
        sd = sd.get("model", sd) if isinstance(sd, dict) and "model" in sd else sd
        k = next(k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point())
        sd[k] = sd[k] + 1.0
        torch.save(sd, o / "irn.pth")
    add("irn_weights_changed_refused", "rerun", ["run_sample.py"] + w.irn_args(box / "rr1"), cwd=IRN,
        setup=irn_changed, contains="irn.pth")

    # in place: the records name their input folders by path, so a copy elsewhere is another input
    irn_same = unchanged(w.irn)
    add("irn_rerun_nothing_changed", "rerun", ["run_sample.py"] + w.irn_args(**{"--log_name": str(box / "rr2log")}),
        "ok", cwd=IRN, setup=irn_same.snap, check=irn_same)

    def dicts_differ(p):
        before = np.load(box / "rr3_before.npy", allow_pickle=True).item()
        after = np.load(w.exp / "rr3" / "dict" / f"{ids[0]}.npy", allow_pickle=True).item()
        same = before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
        return "the dicts were not recomputed with the other checkpoint" if same else None

    def rr3():
        e = fresh_copy(w.exp / w.name, w.exp / "rr3")
        shutil.copy2(e / "dict" / f"{ids[0]}.npy", box / "rr3_before.npy")
    add("infer_other_ckpt_recomputed", "rerun", ["infer.py"] + w.infer_args("rr3", **{"--ckpt": str(w.ckpt2)}), "ok",
        setup=rr3, check=dicts_differ)
    rr4 = w.exp / "rr4"
    rr4_same = unchanged(rr4 / "dict")

    def rr4_setup():
        fresh_copy(w.exp / w.name, rr4)
        rr4_same.snap()
    add("infer_rerun_nothing_changed", "rerun", ["infer.py"] + w.infer_args("rr4"), "ok", setup=rr4_setup,
        check=rr4_same)
    rr5 = box / "rr5"
    rr5_same = unchanged(rr5)

    def rr5_setup():
        fresh_copy(w.work / "mask", rr5)
        rr5_same.snap()
    add("gen_mask_rerun_nothing_changed", "rerun", ["gen_mask.py"] + w.gen_mask_args(**{"--mask_out_dir": str(rr5)}),
        "ok", cwd=IRN, setup=rr5_setup, check=rr5_same)

    def rr6_setup():
        fresh_copy(w.work / "mask", box / "rr6")
    add("gen_mask_other_thd_recomputed", "rerun", ["gen_mask.py"] + w.gen_mask_args(**{"--mask_out_dir": str(box / "rr6"),
                                                                                      "--thd": "0.9"}),
        "error_or_ok", cwd=IRN, setup=rr6_setup,
        check=lambda p: None if digest_tree(box / "rr6") != digest_tree(w.work / "mask") else "masks not recomputed")
    # -- further cases: a failed rerun must leave finished outputs in place, wrong kinds of files
    x1 = w.exp / "x1"
    x1_same = unchanged(x1 / "dict")

    def x1_setup():
        fresh_copy(w.exp / w.name, x1)
        (box / "x1.pth").write_bytes(b"garbage" * 100)
        x1_same.snap()
    add("x_infer_bad_ckpt_keeps_dicts", "rerun", ["infer.py"] + w.infer_args("x1", **{"--ckpt": str(box / "x1.pth")}),
        setup=x1_setup, check=x1_same, contains="x1.pth")
    add("x_beco_test_with_stage_one_ckpt", "content",
        ["main.py"] + w.beco_args("x2", box / "x2", **{"--test": None, "--ckpt": str(w.ckpt)}), cwd=SEG,
        contains=str(w.ckpt))
    add("x_infer_with_beco_ckpt", "content",
        ["infer.py"] + w.infer_args("x3", **{"--ckpt": str(w.beco / "seg" / "best_ckpt.pth")}), contains="best_ckpt.pth")
    add("x_irn_cam_weights_beco", "content",
        ["run_sample.py"] + w.irn_args(box / "x4", **{"--cam_weights_name": str(w.beco / "seg" / "best_ckpt")}),
        cwd=IRN, contains="best_ckpt")

    def x5():
        e = fresh_copy(w.exp / w.name, w.exp / "x5")
        ck = e / "ckpt" / "last.pth"
        torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, ck)  # a training state of something else
    add("x_train_resume_foreign_last", "content", ["train.py"] + w.train_args("x5", **{"--resume": None}), setup=x5,
        contains="last.pth")
    add("x_train_resume_other_width", "content",
        ["train.py"] + w.train_args("x6", **{"--resume": None, "--width": "0.25"}),
        setup=lambda: fresh_copy(w.exp / w.name, w.exp / "x6") and None, contains="x6")

    def x7():
        p = box / "x7" / "pred"
        fresh_copy(w.voc / "SegmentationClass", p)
        from PIL import Image
        q = p / f"{ids[0]}.png"
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(q)
    add("x_eval_png_wrong_size", "content",
        ["evaluation.py"] + w.eval_args(**{"--task": "png", "--pred_dir": str(box / "x7" / "pred")}), setup=x7,
        contains=ids[0])
    add("x_gen_mask_empty_score_dir", "content",
        ["gen_mask.py"] + w.gen_mask_args(**{"--score_dir": str(box / "x8" / "score"), "--mask_out_dir": str(box / "x8" / "m")}),
        cwd=IRN, setup=lambda: (box / "x8" / "score").mkdir(parents=True, exist_ok=True), contains="score")
    add("x_pipeline_from_beco_nothing_upstream", "missing",
        ["run_pipeline.py", "--preset", "toy", "--size", "tiny", "--name", "probe_x9", "--data_root",
         str(box / "x9" / "toy"), "--from", "beco", "--quiet", "--no_report"], contains="probe_x9",
        setup=lambda: shutil.rmtree(ROOT / "experiments" / "probe_x9", ignore_errors=True))

    def x10():
        root = box / "x10" / "coco"
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "instances_train2014.json").write_text('{"images": [')
        (root / "annotations" / "instances_val2014.json").write_text('{"images": [')
    add("x_coco_prepare_truncated_json", "content", ["coco14/prepare.py", "--coco_root", str(box / "x10" / "coco"),
                                                     "--workers", "1"], setup=x10, contains="instances_")
    add("x_beco_second_run_elsewhere_ok", "rerun",
        ["main.py"] + w.beco_args("x11", box / "x11", **{"--max_epoch": "1"}), "ok", cwd=SEG,
        setup=lambda: shutil.rmtree(box / "x11", ignore_errors=True))
    add("x_beco_resume_other_width", "content",
        ["main.py"] + w.beco_args("seg", box / "x12", **{"--resume": None, "--max_epoch": "2", "--backbone_width": "16"}),
        cwd=SEG, setup=lambda: fresh_copy(w.beco / "seg", box / "x12" / "seg") and None, contains="x12")
    add("pipeline_dry_run", "rerun", ["run_pipeline.py", "--preset", "toy", "--size", "tiny", "--dry_run"], "ok")
    return C


def Image_size(p: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(p) as im:
        return im.size[1], im.size[0]


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--only", default=None, help="run only cases whose name or category contains this")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "probe_errors.json"))
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="probe_errors_"))
    work.mkdir(parents=True, exist_ok=True)
    w = World(work)
    if not (w.irn / "irn.pth").exists() or not (w.beco / "seg" / "best_ckpt.pth").exists():
        w.build()
    if not w.ckpt2.exists():
        sh(["train.py"] + w.train_args(w.name2, **{"--seed": "1"}))
    all_cases = cases(w) + cases_more(w) + cases_content(w) + cases_sigint_rerun(w)
    names = [c.name for c in all_cases]
    assert len(names) == len(set(names)), "duplicate case names"
    if args.only:
        all_cases = [c for c in all_cases if args.only in c.name or args.only == c.category]
    rows = []
    t0 = time.time()
    for c in all_cases:
        verdict, got, dt = run_case(c)
        rows.append({"case": c.name, "category": c.category, "expected": c.expected(), "got": got,
                     "verdict": verdict, "seconds": round(dt, 1)})
        print(f"{verdict:4s} {c.category:8s} {c.name:38s} {dt:5.1f}s  {got[:220]}", flush=True)
    by_cat: dict[str, dict[str, int]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], {"PASS": 0, "FAIL": 0, "SKIP": 0})[r["verdict"]] += 1
    print("\nsummary:")
    for cat, n in by_cat.items():
        print(f"  {cat:9s} PASS {n['PASS']:3d}  FAIL {n['FAIL']:3d}  SKIP {n['SKIP']:3d}")
    tot = {k: sum(n[k] for n in by_cat.values()) for k in ("PASS", "FAIL", "SKIP")}
    print(f"  {'total':9s} PASS {tot['PASS']:3d}  FAIL {tot['FAIL']:3d}  SKIP {tot['SKIP']:3d}"
          f"  ({time.time() - t0:.0f}s)")
    from bench._meta import machine_meta

    out = {"cases": rows, "summary": by_cat, "total": tot, "work": str(work), "machine_meta": machine_meta()}
    if not args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    for name in ("probe_sigint", "probe_x9"):
        shutil.rmtree(ROOT / "experiments" / name, ignore_errors=True)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if tot["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
