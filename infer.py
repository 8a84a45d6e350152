"""Stage one inference: multi-scale + flip CAM dictionaries (seed command 1).

    python infer.py --name ktse1 --model ktse --load_epo 31 --dict --infer_list voc12/train_aug.txt

loads ``experiments/<name>/ckpt/<load_epo:03d>net_main.pth`` (a plain ``Net_gpp`` state_dict) and, for
every listed image, writes ``experiments/<name>/dict/<id>.npy`` = ``{class index: float32 HxW CAM in
[0,1)}`` (the reference format, stage1.md §5). ``--crf`` adds ``crf/<alpha:02d>/<id>.npy`` and
``--vis`` CAM overlays in ``train/``.

Speed without changing the numbers: a scale and its flip run as one batch, inference_mode, DataLoader
workers decode and resize ahead, a background thread writes outputs (and runs CRF/overlays).
``torchrun --nproc_per_node N infer.py ...`` splits the list over ranks. Every file is written
atomically. Each output folder keeps a record of what made it (``.provenance.json``, docs/formats.md):
a rerun reuses an image's outputs only when the checkpoint (sha256), labels, scales, amp, width and
the image are unchanged, and recomputes the rest, printing one line that names what changed
(``--overwrite`` redoes everything).
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools import cli
from tools.errors import DataError, MissingFileError, WSSSError, require_all, run_cli

VIS_TAG = 42  # reference: infer_multi is called with epoch tag 42
MODELS = ("ktse",)
CKPT_HINT = ("Train one with `python train.py --name <name> --model ktse`, or put a released checkpoint "
             "(e.g. 031net_main.pth) in experiments/<name>/ckpt/ (or pass --ckpt).")


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # reference flags (stage1.md §5.1); the ones marked unused are accepted for command compatibility
    p.add_argument("--infer_list", default="voc12/train.txt",
                   help="image list (plain ids or /JPEGImages/<id>.jpg lines)")
    p.add_argument("--num_workers", type=int, default=8, help="reference flag (unused there); see --workers")
    p.add_argument("--batch_size", type=int, default=8, help="unused (reference compatibility)")
    p.add_argument("--resize", type=float, nargs="+", default=[256, 512], help="unused (reference compatibility)")
    p.add_argument("--crop", type=int, nargs="+", default=[320, 320], help="unused (reference compatibility)")
    p.add_argument("--cj", type=float, nargs="+", default=[0.4, 0.4, 0.4, 0.1], help="unused (reference compatibility)")
    p.add_argument("--lr", type=float, default=0.01, help="unused (reference compatibility)")
    p.add_argument("--wt_dec", type=float, default=5e-4, help="unused (reference compatibility)")
    p.add_argument("--max_epoches", type=int, default=8, help="unused (reference compatibility)")
    p.add_argument("--model", default="ktse",
                   help="stage-one model; only 'ktse' exists (the reference default 'aeft_gpp' did not)")
    p.add_argument("--name", required=True, help="experiment name (folder experiments/<name>)")
    p.add_argument("--gpu", type=int, default=-1, help="unused (reference compatibility); see --device")
    p.add_argument("--load_epo", type=cli.nonneg_int, required=True, help="checkpoint epoch: ckpt/<load_epo:03d>net_main.pth")
    p.add_argument("--RCAM_T", type=float, nargs="+", default=[0.3, 0.15], help="unused (training only)")
    p.add_argument("--D", type=cli.positive_int, default=256, help="fc8 width (read from the checkpoint when it differs)")
    p.add_argument("--M", type=float, default=0.996, help="unused (reference compatibility)")
    p.add_argument("--TH", type=float, nargs="+", default=[0.3], help="unused (reference compatibility)")
    p.add_argument("--T", type=float, default=2.0, help="unused (reference compatibility)")
    p.add_argument("--W", type=float, nargs="+", default=[1, 1, 1], help="unused (reference compatibility)")
    p.add_argument("--CRF", type=int, default=4, help="unused (reference compatibility)")
    p.add_argument("--MEM", type=int, default=4, help="unused (reference compatibility)")
    p.add_argument("--vis", action="store_true", help="CAM overlay PNGs in experiments/<name>/train/")
    p.add_argument("--dict", action="store_true", help="save the CAM dictionaries (without it nothing is saved, "
                   "as the reference)")
    p.add_argument("--crf", action="store_true", help="CRF dictionaries in experiments/<name>/crf/<alpha:02d>/")
    p.add_argument("--print_freq", type=int, default=100, help="unused (reference compatibility)")
    p.add_argument("--out_num", type=int, default=100, help="unused (reference compatibility)")
    p.add_argument("--alphas", type=cli.positive_int, nargs="+", default=[5, 7, 9], help="CRF background exponents")
    # added
    p.add_argument("--data_root", default="data/VOC2012", help="VOC2012 folder (JPEGImages/)")
    p.add_argument("--cls_labels", default="voc12/cls_labels.npy", help="image-level labels {id: (20,)}")
    p.add_argument("--exp_root", default="experiments", help="folder holding experiments/<name>")
    p.add_argument("--ckpt", default=None, help="explicit checkpoint path (overrides --name/--load_epo lookup)")
    p.add_argument("--width", type=cli.positive_float, default=None,
                   help="trunk width multiplier of the checkpoint (default: read from its tensor shapes)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="mixed-precision forward (fp16 on CUDA, bf16 on CPU); "
                   "changes the numbers slightly")
    p.add_argument("--workers", type=cli.nonneg_int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding and resizing ahead (0 = main process)")
    p.add_argument("--threads", type=cli.nonneg_int, default=None, help="torch CPU threads (default and 0: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--scales", type=cli.positive_float, nargs="+", default=[0.5, 1.0, 1.5, 2.0], help="inference scales")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

class Paths:
    """Output locations of one experiment (reference ``make_path``)."""

    def __init__(self, exp_root: str, name: str, alphas: list[int]) -> None:
        self.root = Path(exp_root) / name
        self.ckpt = self.root / "ckpt"
        self.dict = self.root / "dict"
        self.vis = self.root / "train"  # reference: infer's overlays go to train/ with tag 042
        self.crf = {a: self.root / "crf" / f"{a:02d}" for a in alphas}

    def make(self, verbose: bool) -> None:
        if not self.root.exists():
            for sub in ("ckpt", "train", "val", "infer", "dict", "crf"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            if verbose:
                print(f"{self.root} is built.")
        else:
            if verbose:
                print(f"{self.root} already exists.")
            self.dict.mkdir(parents=True, exist_ok=True)
        for d in self.crf.values():
            d.mkdir(parents=True, exist_ok=True)

    def checkpoint(self, epo: int) -> Path:
        return self.ckpt / f"{epo:03d}net_main.pth"


#: output-format versions of the dictionaries, CRF dictionaries and overlays (tools.provenance records);
#: bump one when the code changes what it writes
DICT_VERSION, CRF_VERSION, VIS_VERSION = 1, 1, 1


class OutputRecord:
    """One output folder's record and this run's plan for it."""

    def __init__(self, prov: Any, outputs: Any, item: Any, ids: list[str], overwrite: bool, what: str) -> None:
        self.prov, self.outputs, self.what = prov, outputs, what
        self.plan = prov.plan(ids, outputs, item, overwrite)


def output_records(paths: Paths, args: argparse.Namespace, ckpt: Path, ids: list[str], keys_of: Any
                   ) -> dict[str, OutputRecord]:
    """Records of the folders this run writes (``dict``, ``crfNN`` per alpha, ``vis``), planned over the
    whole list: a dictionary depends on the checkpoint (sha256), class labels, data root, scales, amp and
    width; CRF dictionaries and overlays on those CAMs (the dictionary record's digest) and their alpha."""
    from tools.provenance import Provenance, file_id, folder_id, stat_key
    from voc12.data import image_path

    def item(i: str) -> list | None:
        return stat_key(image_path(args.data_root, i))

    cam = Provenance(paths.dict, "infer", DICT_VERSION,
                     {"stage-one checkpoint": file_id(ckpt, content=True),
                      "cls_labels": file_id(args.cls_labels, content=True), "data_root": folder_id(args.data_root)},
                     {"scales": [float(s) for s in args.scales], "amp": bool(args.amp), "width": args.width})
    cams = {"digest": cam.digest}  # what the CRF dictionaries and overlays were made from
    out: dict[str, OutputRecord] = {}
    if args.dict:
        out["dict"] = OutputRecord(cam, lambda i: [paths.dict / f"{i}.npy"], item, ids, args.overwrite,
                                   "CAM dictionaries")
    if args.crf:
        for a, folder in paths.crf.items():
            prov = Provenance(folder, "infer --crf", CRF_VERSION,
                              {"cams": cams, "data_root": folder_id(args.data_root)}, {"alpha": a})
            out[f"crf{a:02d}"] = OutputRecord(prov, lambda i, f=folder: [f / f"{i}.npy"], item, ids,
                                              args.overwrite, f"CRF dictionaries (alpha {a})")
    if args.vis:
        from models.cam import overlay_path

        prov = Provenance(paths.vis, "infer --vis", VIS_VERSION, {"cams": cams, "data_root": folder_id(args.data_root)},
                          {"tag": VIS_TAG})
        out["vis"] = OutputRecord(prov, lambda i: [overlay_path(paths.vis, VIS_TAG, i, k) for k in keys_of(i)], item,
                                  ids, args.overwrite, "overlays")
    return out


def remove_stale_temps(folder: Path, ids: set[str]) -> None:
    """Delete temporary files a killed run left for our ids. Those of a live writer (another
    infer.py over an overlapping list) are kept: removing them would fail its rename."""
    from tools.io import is_stale_temp, temp_final_name

    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        final = temp_final_name(p)
        if final is None or not is_stale_temp(p):
            continue
        if final.endswith(".npy"):
            img_id = final[:-4]
        elif final.startswith(f"{VIS_TAG:03d}_") and "_cam_" in final:
            img_id = final[4:final.rindex("_cam_")]
        else:
            continue
        if img_id in ids:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def infer_width(state_dict: dict, requested: float | None) -> float:
    """Trunk width of a ``Net_gpp`` state dict: ``b7.conv_branch1.weight`` has ``4096 * width`` rows."""
    if requested is not None:
        return float(requested)
    w = state_dict.get("b7.conv_branch1.weight")
    if w is None:
        return 1.0  # let the strict load name the missing keys
    return float(w.shape[0]) / 4096.0


def load_network(path: Path, width: float | None, D: int, device: Any):
    """Build ``Net_gpp`` matching the checkpoint and load it strictly (clear errors otherwise)."""
    import torch

    from models.resnet38d import Net_gpp
    from tools.checkpoint import load_state_dict_checked, load_torch_file

    sd = load_torch_file(path, "stage-one checkpoint", CKPT_HINT)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict) and "fc9.weight" not in sd:
        sd = sd["model"]  # a training-state file (last.pth): take its network weights
    if not isinstance(sd, dict):
        raise DataError(f"'{path}' holds {type(sd).__name__}; expected a Net_gpp state_dict.")
    w = infer_width(sd, width)
    fc8 = sd.get("fc8.weight")
    d = int(fc8.shape[0]) if fc8 is not None else D
    net = Net_gpp(D=d, C=20, width=w)
    load_state_dict_checked(net, sd, strict=True, what=f"checkpoint '{path}' (width {w:g})")
    net.eval()
    return net.to(device), w


# ----------------------------------------------------------------------------------------------
# Background writer
# ----------------------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes dictionaries, overlays and CRF dictionaries off the main thread (torch releases the
    GIL during the forward, so writing overlaps the next image's compute). A bounded queue keeps
    memory flat; the first error is kept and re-raised by :meth:`close`."""

    def __init__(self, paths: Paths, args: argparse.Namespace, maxsize: int = 8) -> None:
        super().__init__(name="infer-writer", daemon=True)
        self.paths, self.args = paths, args
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.stop_now = threading.Event()
        self.done = 0
        # ids whose overlays / CRF dictionaries (per alpha) must be (re)written; set by run()
        self.vis_todo: set[str] = set()
        self.crf_todo: dict[int, set[str]] = {}

    def put(self, img_id: str, cam_dict: dict, write_dict: bool) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((img_id, cam_dict, write_dict))

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None or self.stop_now.is_set():
                return
            try:
                self.handle(*item)
                self.done += 1
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
                return

    def handle(self, img_id: str, cam_dict: dict, write_dict: bool) -> None:
        from tools.io import atomic_save_npy

        a = self.args
        if write_dict:
            atomic_save_npy(self.paths.dict / f"{img_id}.npy", cam_dict)
        if a.vis or a.crf:
            from voc12.data import load_image

            img = load_image(a.data_root, img_id)
            if a.vis and img_id in self.vis_todo:
                from models.cam import save_overlays

                save_overlays(img, cam_dict, self.paths.vis, VIS_TAG, img_id)
            if a.crf:
                from models.cam import crf_dict

                for alpha, folder in self.paths.crf.items():
                    if img_id in self.crf_todo.get(alpha, ()):
                        atomic_save_npy(folder / f"{img_id}.npy", crf_dict(img, cam_dict, alpha))

    def close(self, abort: bool = False) -> None:
        """Finish the queued items (or, with ``abort``, only the one being written) and stop."""
        if abort:
            self.stop_now.set()
            with self.q.mutex:
                self.q.queue.clear()
                self.q.not_full.notify_all()
        if self.is_alive():
            self.q.put(None)
            self.join()
        if self.error is not None and not abort:
            raise self.error


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def _single_item(batch):  # DataLoader collate for batch_size=None: items stay (id, [arrays], label)
    return batch


def run(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from models.cam import msf_cam
    from tools import dist
    from tools.provenance import report
    from tools.misc import get_device
    from voc12.data import MSFDataset, image_path, labels_for, load_cls_labels, read_id_list
    from tools.errors import require_dir

    if args.model not in MODELS:
        raise WSSSError(f"--model {args.model!r} does not exist; stage one has only {', '.join(MODELS)} "
                        "(the reference's default 'aeft_gpp' was never shipped): pass --model ktse.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_distributed_mode(args)
    main_proc = args.rank == 0
    if args.distributed and torch.cuda.is_available() and args.device in ("auto", "cuda"):
        device = torch.device("cuda", args.gpu)
    else:
        device = get_device(args.device)

    paths = Paths(args.exp_root, args.name, args.alphas)
    paths.make(verbose=main_proc)
    if not (args.dict or args.crf or args.vis) and main_proc:
        print("warning: none of --dict, --crf, --vis given: nothing will be saved (as the reference).",
              file=sys.stderr)
    ckpt = Path(args.ckpt) if args.ckpt else paths.checkpoint(args.load_epo)

    ids = read_id_list(args.infer_list)
    cls_labels = load_cls_labels(args.cls_labels)
    labels = labels_for(ids, cls_labels, args.cls_labels)
    require_dir(Path(args.data_root) / "JPEGImages", "VOC JPEGImages folder",
                "Pass --data_root <VOC2012 folder> (or make the toy set: python -m voc12.toy --out data/toy).")
    label_of = dict(zip(ids, labels))
    empty = [i for i in ids if label_of[i].sum() <= 0]
    if empty and main_proc:
        print(f"warning: {len(empty)} image(s) have no class label (e.g. {empty[0]}); their dictionaries are "
              "empty (the reference crashes on them).", file=sys.stderr)

    mine = dist.split_for_rank(ids)
    mine_set = set(mine)
    for folder in [paths.dict, paths.vis, *paths.crf.values()]:
        remove_stale_temps(folder, mine_set)

    def keys_of(i: str) -> list[int]:
        return [int(k) for k in np.flatnonzero(label_of[i] > 1e-5)]

    # What to redo: each output folder's record (tools.provenance) must match the current inputs and
    # settings; every rank plans over all ids from the records as they were before this run.
    records = output_records(paths, args, ckpt, ids, keys_of)
    dist.barrier()
    if main_proc:
        for rec in records.values():
            line = report(rec.prov.step, rec.plan, rec.what)
            if line:
                print(line, flush=True)
            if rec.plan.todo or not rec.prov.complete:
                rec.prov.begin(rec.plan, rec.outputs)
    dist.barrier()
    todo = {name: set(rec.plan.todo) for name, rec in records.items()}
    todo_net, todo_post = [], []  # need the network / only need overlays or CRF from the saved dict
    for i in mine:
        if not any(i in t for t in todo.values()):
            continue
        if args.dict and i not in todo["dict"]:
            todo_post.append(i)  # its saved dict matches the current checkpoint and settings
        else:
            todo_net.append(i)
    missing_img = [i for i in todo_net + todo_post if not image_path(args.data_root, i).is_file()]
    if missing_img:
        raise MissingFileError(f"{len(missing_img)} listed image(s) not found, e.g. "
                               f"'{image_path(args.data_root, missing_img[0])}' (id '{missing_img[0]}' from "
                               f"{args.infer_list}). Check --data_root and --infer_list.")
    skipped = len(mine) - len(todo_net) - len(todo_post)
    if main_proc:
        print(f"{len(ids)} images in {args.infer_list}; this rank: {len(todo_net)} to infer, "
              f"{len(todo_post)} to post-process from saved dicts, {skipped} already done"
              f"{' (--overwrite to redo)' if skipped else ''}.", flush=True)

    stats = {"inferred": 0, "post": len(todo_post), "skipped": skipped, "seconds": 0.0, "width": None}
    writer = Writer(paths, args)
    writer.crf_todo = {a: todo[f"crf{a:02d}"] for a in paths.crf} if args.crf else {}
    writer.vis_todo = todo.get("vis", set())
    writer.start()
    t0 = time.perf_counter()
    try:
        if todo_post:
            from models.seed_eval import load_dict

            for i in todo_post:
                writer.put(i, load_dict(paths.dict / f"{i}.npy"), write_dict=False)
        if todo_net:
            net, width = load_network(ckpt, args.width, args.D, device)
            stats["width"] = width
            ds = MSFDataset(todo_net, args.data_root, cls_labels, scales=tuple(args.scales),
                            labels_source=args.cls_labels)
            loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=max(0, args.workers),
                                collate_fn=_single_item, pin_memory=device.type == "cuda",
                                persistent_workers=False)
            bar = tqdm(loader, total=len(ds), desc=f"infer rank{args.rank}" if args.distributed else "infer",
                       unit="img", disable=args.no_progress or not main_proc, dynamic_ncols=True)
            for img_id, inputs, label in bar:
                tensors = [torch.from_numpy(np.asarray(x)) for x in inputs]
                size = tuple(int(s) for s in inputs[2 if len(inputs) > 2 else 0].shape[-2:])
                cam = msf_cam(net, tensors, label, size=size, amp=args.amp)
                writer.put(img_id, cam, write_dict=bool(args.dict))
                stats["inferred"] += 1
        writer.close()
    except BaseException:
        writer.close(abort=True)
        raise
    stats["seconds"] = time.perf_counter() - t0
    dist.barrier()
    if main_proc:
        for rec in records.values():
            rec.prov.finish()
        rate = stats["inferred"] / stats["seconds"] if stats["seconds"] > 0 and stats["inferred"] else 0.0
        print(f"done: {stats['inferred']} inferred ({rate:.3g} img/s on {device}), {stats['post']} "
              f"post-processed, {stats['skipped']} skipped; outputs in {paths.root}", flush=True)
    return stats


def check_inputs(args: argparse.Namespace) -> None:
    """Raise ONE error naming every input file of this run that is missing (list, labels, images,
    checkpoint), before any output folder is made. The checkpoint is needed only when some listed
    image has no saved dictionary yet (or with --overwrite)."""
    from voc12.data import LABELS_HINT, VOC_HINT, read_id_list

    ckpt = Path(args.ckpt) if args.ckpt else Paths(args.exp_root, args.name, []).checkpoint(args.load_epo)
    needs_net = True
    if not args.overwrite and Path(args.infer_list).is_file():
        dict_dir = Paths(args.exp_root, args.name, []).dict
        try:
            needs_net = not all((dict_dir / f"{i}.npy").is_file() for i in read_id_list(args.infer_list))
        except WSSSError:
            needs_net = True  # an unreadable list is reported by run() itself
    require_all([
        (args.infer_list, "image list (--infer_list)", LABELS_HINT),
        (args.cls_labels, "class-label file (--cls_labels)", LABELS_HINT),
        (Path(args.data_root) / "JPEGImages", "VOC JPEGImages folder (--data_root)", VOC_HINT, "dir"),
        (ckpt if needs_net else None, "stage-one checkpoint", CKPT_HINT),
    ], context="before inference started")


def _checked_run(args: argparse.Namespace) -> None:
    check_inputs(args)
    run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return run_cli(_checked_run, args)
    finally:
        torch.set_num_threads(threads)  # --threads must not leak when main() is called in-process


if __name__ == "__main__":
    sys.exit(main())
