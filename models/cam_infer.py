"""Stage-one CAM inference over an image list: what ``infer.py`` runs (its flags are the fields of
:class:`InferSettings`).

For every listed image, ``<exp_root>/<name>/dict/<id>.npy`` = ``{class index: float32 HxW CAM in [0,1)}``
(the reference format, docs/formats.md); ``crf`` adds ``crf/<alpha:02d>/<id>.npy`` and ``vis`` CAM overlays in
``train/``. A scale and its flip run as one batch (models/cam.py), DataLoader workers decode ahead, and a
background :class:`Writer` thread writes outputs (and runs CRF/overlays). Under torchrun the list is split
over ranks. Every file is written atomically; each output folder keeps a record of what made it
(tools.provenance), so a rerun redoes only images whose inputs or settings changed.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.errors import MissingFileError, require_all
from tools.layout import REFERENCE_SUBDIRS, StageOneLayout

__all__ = ["InferSettings", "Paths", "OutputRecord", "output_records", "remove_stale_temps", "Writer", "run",
           "check_inputs", "CKPT_HINT", "VIS_TAG"]

VIS_TAG = 42  # reference: infer_multi is called with epoch tag 42
CKPT_HINT = ("Train one with `python train.py --name <name> --model ktse`, or put a released checkpoint "
             "(e.g. 031net_main.pth) in experiments/<name>/ckpt/ (or pass --ckpt).")


def dataset_args(args: Any):
    """Fill ``data_root``, ``cls_labels`` and ``infer_list`` left unset from the ``dataset`` descriptor
    (VOC: data/VOC2012, voc12/cls_labels.npy, voc12/train.txt); returns the descriptor."""
    from tools.dataset import fill_dataset_defaults

    return fill_dataset_defaults(args, "data_root", cls_labels="cls_labels", infer_list="seed_list")


@dataclass
class InferSettings:
    """Everything :func:`run` reads, with infer.py's defaults (infer.py takes its flag defaults from here,
    so a bench or a test can call :func:`run` without the command line). Any object with these
    attributes works (infer.py passes its ``argparse.Namespace``); :func:`run` adds the distributed
    fields (``rank``, ``world_size``, ``gpu``, ``distributed``)."""

    name: str = "ktse"
    load_epo: int = 0
    model: str = "ktse"
    dataset: str = "voc12"  # a tools.dataset name; the three paths below default to its lists and root
    infer_list: str | None = None
    data_root: str | None = None
    cls_labels: str | None = None
    exp_root: str = "experiments"
    ckpt: str | None = None
    width: float | None = None
    D: int = 256
    dict: bool = False
    crf: bool = False
    vis: bool = False
    alphas: list[int] = field(default_factory=lambda: [5, 7, 9])
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    device: str = "auto"
    amp: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    threads: int | None = None
    overwrite: bool = False
    no_progress: bool = False


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

class Paths:
    """infer.py's view of the experiment layout (:class:`tools.layout.StageOneLayout`): this run's
    CRF folders by alpha and the reference ``make_path`` messages."""

    def __init__(self, exp_root: str, name: str, alphas: list[int]) -> None:
        self.layout = StageOneLayout.of(exp_root, name)
        self.root, self.ckpt, self.dict = self.layout.root, self.layout.ckpt, self.layout.dict
        self.vis = self.layout.train  # reference: infer's overlays go to train/ with tag 042
        self.crf = {a: self.layout.crf(a) for a in alphas}

    def make(self, verbose: bool) -> None:
        existed = self.layout.make(self.crf, ("dict",) if self.root.exists() else REFERENCE_SUBDIRS)
        if verbose:
            print(f"{self.root} already exists." if existed else f"{self.root} is built.")

    def checkpoint(self, epo: int) -> Path:
        return self.layout.checkpoint(epo)


#: output-format versions of the dictionaries, CRF dictionaries and overlays (tools.provenance records);
#: bump one when the code changes what it writes
DICT_VERSION, CRF_VERSION, VIS_VERSION = 1, 1, 1


class OutputRecord:
    """One output folder's record and this run's plan for it."""

    def __init__(self, prov: Any, outputs: Any, item: Any, ids: list[str], overwrite: bool, what: str) -> None:
        self.prov, self.outputs, self.what = prov, outputs, what
        self.plan = prov.plan(ids, outputs, item, overwrite)


def output_records(paths: Paths, args: Any, ckpt: Path, ids: list[str], keys_of: Any
                   ) -> dict[str, OutputRecord]:
    """Records of the folders this run writes (``dict``, ``crfNN`` per alpha, ``vis``), planned over the
    whole list: a dictionary depends on the checkpoint (sha256), class labels, data root, scales, amp and
    width; CRF dictionaries and overlays on those CAMs (the dictionary record's digest) and their alpha."""
    from tools.provenance import Provenance, file_id, folder_id, stat_key
    from voc12.data import image_path

    info = dataset_args(args)

    def item(i: str) -> list | None:
        return stat_key(image_path(args.data_root, i, info))

    cam = Provenance(paths.dict, "infer", DICT_VERSION,
                     {"stage-one checkpoint": file_id(ckpt, content=True),
                      "cls_labels": file_id(args.cls_labels, content=True), "data_root": folder_id(args.data_root)},
                     {"scales": [float(s) for s in args.scales], "amp": bool(args.amp), "width": args.width,
                      "dataset": info.name})
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
        out["vis"] = OutputRecord(prov, lambda i: [overlay_path(paths.vis, VIS_TAG, i, k, info.class_names)
                                                   for k in keys_of(i)], item,
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
# Background writer
# ----------------------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes dictionaries, overlays and CRF dictionaries off the main thread (torch releases the
    GIL during the forward, so writing overlaps the next image's compute). A bounded queue keeps
    memory flat; the first error is kept and re-raised by :meth:`close`."""

    def __init__(self, paths: Paths, args: Any, maxsize: int = 8) -> None:
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

            info = dataset_args(a)
            img = load_image(a.data_root, img_id, info)
            if a.vis and img_id in self.vis_todo:
                from models.cam import save_overlays

                save_overlays(img, cam_dict, self.paths.vis, VIS_TAG, img_id, class_names=info.class_names)
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
# The run
# ----------------------------------------------------------------------------------------------

def _single_item(batch):  # DataLoader collate for batch_size=None: items stay (id, [arrays], label)
    return batch


def run(args: Any) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from models.cam import msf_cam
    from models.registry import get_model
    from models.resnet38d import load_stage_one
    from tools import dist
    from tools.provenance import report
    from tools.runtime import setup_runtime
    from voc12.data import MSFDataset, image_path, labels_for, load_cls_labels, read_id_list
    from tools.errors import require_dir

    get_model(args.model)  # an unknown name: one error listing the known ones
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime(args)  # torchrun env + --device (one GPU per process under DDP)
    main_proc, device = rt.is_main, rt.device

    paths = Paths(args.exp_root, args.name, args.alphas)
    paths.make(verbose=main_proc)
    if not (args.dict or args.crf or args.vis) and main_proc:
        print("warning: none of --dict, --crf, --vis given: nothing will be saved (as the reference).",
              file=sys.stderr)
    ckpt = Path(args.ckpt) if args.ckpt else paths.checkpoint(args.load_epo)

    info = dataset_args(args)
    ids = read_id_list(args.infer_list)
    cls_labels = load_cls_labels(args.cls_labels, info)
    labels = labels_for(ids, cls_labels, args.cls_labels, info)
    require_dir(Path(args.data_root) / info.image_folder, f"{info.name} image folder (--data_root)", info.root_hint)
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
    todo = {name: set(rec.plan.todo) for name, rec in records.items()}
    todo_net, todo_post = [], []  # need the network / only need overlays or CRF from the saved dict
    for i in mine:
        if not any(i in t for t in todo.values()):
            continue
        if args.dict and i not in todo["dict"]:
            todo_post.append(i)  # its saved dict matches the current checkpoint and settings
        else:
            todo_net.append(i)
    missing_img = [i for i in todo_net + todo_post if not image_path(args.data_root, i, info).is_file()]
    if missing_img:
        raise MissingFileError(f"{len(missing_img)} listed image(s) not found, e.g. "
                               f"'{image_path(args.data_root, missing_img[0], info)}' (id '{missing_img[0]}' from "
                               f"{args.infer_list}). Check --data_root and --infer_list.")
    # The network is loaded before the records begin: beginning deletes the outputs to redo, and an
    # unreadable checkpoint must leave the earlier outputs in place.
    net = load_stage_one(ckpt, args.width, args.D, model=args.model, hint=CKPT_HINT) if todo_net else None
    dist.barrier()
    if main_proc:
        for rec in records.values():
            line = report(rec.prov.step, rec.plan, rec.what)
            if line:
                print(line, flush=True)
            if rec.plan.todo or not rec.prov.complete:
                rec.prov.begin(rec.plan, rec.outputs)
    dist.barrier()
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
            from tools.seed_eval import load_dict

            for i in todo_post:
                writer.put(i, load_dict(paths.dict / f"{i}.npy"), write_dict=False)
        if todo_net:
            net = net.to(device)
            stats["width"] = net.width
            check_class_count(net, info, ckpt)
            ds = MSFDataset(todo_net, args.data_root, cls_labels, scales=tuple(args.scales),
                            labels_source=args.cls_labels, dataset=info)
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


def check_class_count(net: Any, info: Any, ckpt: Path) -> None:
    """Refuse a checkpoint whose class head (``net.C`` foreground classes) is not the dataset's: a VOC
    checkpoint used with ``--dataset coco14`` would otherwise fail deep inside with an index error."""
    c = getattr(net, "C", None)
    if c is not None and int(c) != info.num_fg:
        from tools.errors import DataError

        raise DataError(f"checkpoint '{ckpt}' has {int(c)} foreground classes; dataset {info.name} has "
                        f"{info.num_fg}. Pass the --dataset the checkpoint was trained on, or its checkpoint.")


def check_inputs(args: Any) -> None:
    """Raise ONE error naming every input file of this run that is missing (list, labels, images,
    checkpoint), before any output folder is made. The checkpoint is needed even when every listed
    image has a saved dictionary: the dictionaries' record names it by content, and without it the saved
    dictionaries cannot be shown to match, so they would be deleted before the load fails."""
    info = dataset_args(args)
    ckpt = Path(args.ckpt) if args.ckpt else Paths(args.exp_root, args.name, []).checkpoint(args.load_epo)
    require_all([
        (args.infer_list, "image list (--infer_list)", info.labels_hint),
        (args.cls_labels, "class-label file (--cls_labels)", info.labels_hint),
        (Path(args.data_root) / info.image_folder, f"{info.name} image folder (--data_root)", info.root_hint, "dir"),
        (ckpt, "stage-one checkpoint", CKPT_HINT),
    ], context="before inference started")
