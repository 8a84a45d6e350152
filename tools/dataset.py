"""Dataset descriptors: everything that differs between VOC 2012 and COCO 2014, in one place.

A :class:`DatasetInfo` holds the class names, the class count, the palette, the ignore value, the
default data root, where images and ground-truth masks lie for an image id, the default image lists
and the image-level label file. Every stage takes ``--dataset <name>`` and reads these from
:func:`get_dataset`; nothing else in the code base writes a class count. The instances live in the
dataset packages (``voc12/dataset.py``, ``coco14/dataset.py``); adding a dataset means writing one
such module and one line in :data:`_REGISTRY` (docs/architecture.md, "Datasets").

Kept free of torch and of the dataset packages at import time (the registry imports them lazily), so
that evaluation workers start fast and the packages can import this module.
"""
from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from tools.errors import DataError

#: name -> "module:attribute" of the descriptor instance.
_REGISTRY: dict[str, str] = {
    "voc12": "voc12.dataset:VOC12",
    "coco14": "coco14.dataset:COCO14",
}
DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_DATASET = "voc12"


def bit_interleaved_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map, ``(n, 3)`` uint8: the bits of index i spread over R, G, B from the most
    significant bit down (1 -> (128,0,0), 255 -> (224,224,192)). Any ``n`` follows the same rule."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def no_subfolder(img_id: str) -> str:
    """Split rule of a flat layout (VOC): every image and mask sits directly in its folder."""
    return ""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset's classes, files and defaults.

    Paths: an image is ``<root>/<image_folder>/<subfolder(id)>/<id><image_ext>``, a ground-truth mask
    ``<gt_dir>/<subfolder(id)>/<id>.png`` with ``gt_dir`` defaulting to ``<root>/<gt_folder>``. In the
    list and label templates ``{root}`` stands for the data root; other relative paths are relative to
    the working directory (the repository root), as the reference's ``voc12/`` files are.
    """

    name: str
    class_names: tuple[str, ...]  # foreground classes, in class-index order 1..C
    default_root: str
    lists: Mapping[str, str]  # list name -> path template ('{root}' = the data root)
    train_list: str  # list names (keys of ``lists``) of each role
    seed_list: str  # images whose seeds / pseudo-labels are scored (the stage-one validation list)
    val_list: str
    cls_labels: str  # path template of the image-level label file
    root_hint: str  # what to download and where to put it (used in missing-file errors)
    labels_hint: str  # how to build the lists and labels
    named_list_folder: str = ""  # evaluation.py --list <name>: '<folder>/<name>.txt' if set, else ``lists``
    image_folder: str = "JPEGImages"
    image_ext: str = ".jpg"
    gt_folder: str = "SegmentationClass"
    aug_gt_folder: str = "SegmentationClass"  # the segmenter's ground truth (VOC: the SBD-augmented masks)
    subfolder: Callable[[str], str] = field(default=no_subfolder, compare=False)
    ignore_index: int = 255
    #: per stage (``train``, ``run_sample``, ``beco``, ``pipeline``), the settings that differ from the VOC
    #: values the stages' parsers default to: {flag destination: value}. Empty for VOC. Applied by
    #: :class:`DatasetArgumentParser` (``stage=``) before parsing, so a flag given on the command line wins.
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def num_fg(self) -> int:
        """C: the number of foreground classes (width of the image-level labels and of ``fc9``)."""
        return len(self.class_names)

    @property
    def num_classes(self) -> int:
        """C + 1: the classes of a label map, background (0) included."""
        return len(self.class_names) + 1

    @property
    def names_bg(self) -> tuple[str, ...]:
        """``("background",) + class_names``: the names of label-map values 0..C."""
        return ("background",) + self.class_names

    def palette(self) -> np.ndarray:
        """``(256, 3)`` uint8 colours of label values 0..255 (255 = ignore)."""
        return bit_interleaved_palette(256)

    def image_path(self, root: os.PathLike | str, img_id: str) -> Path:
        return Path(root) / self.image_folder / self.subfolder(img_id) / f"{img_id}{self.image_ext}"

    def gt_dir(self, root: os.PathLike | str, aug: bool = False) -> Path:
        """The default ground-truth folder under ``root`` (``aug``: the segmenter's)."""
        return Path(root) / (self.aug_gt_folder if aug else self.gt_folder)

    def gt_path(self, gt_dir: os.PathLike | str, img_id: str) -> Path:
        """The mask of ``img_id`` inside a ground-truth folder (``<gt_dir>/[<split>/]<id>.png``)."""
        return Path(gt_dir) / self.subfolder(img_id) / f"{img_id}.png"

    def list_path(self, name: str, root: os.PathLike | str | None = None) -> Path:
        """The file of the list called ``name`` (a key of :attr:`lists`), under ``root`` (default
        :attr:`default_root`) where the template says so."""
        if name not in self.lists:
            raise DataError(f"dataset {self.name} has no list called '{name}'; known lists: "
                            f"{', '.join(self.lists)} (or pass a path to a list file).")
        return Path(self.lists[name].format(root=root if root is not None else self.default_root))

    def named_list(self, name: str, root: os.PathLike | str | None = None) -> Path:
        """A list given by name on a command line: ``<named_list_folder>/<name>.txt`` when the dataset has
        such a folder (VOC's ``ImageSets/Segmentation``, as the reference scripts), else :meth:`list_path`."""
        root = root if root is not None else self.default_root
        if self.named_list_folder:
            return Path(self.named_list_folder.format(root=root)) / f"{name}.txt"
        return self.list_path(name, root)

    def list_arg(self, value: str, root: os.PathLike | str | None = None) -> Path:
        """A ``--list`` value: a path to a list file (it ends in ``.txt``, has a folder or exists) as given,
        else a list name (VOC ``train``; COCO ``train``, ``val``, ``val_part``) via :meth:`named_list`."""
        if value.endswith(".txt") or os.sep in value or "/" in value or Path(value).is_file():
            return Path(value)
        return self.named_list(value, root)

    def cls_labels_path(self, root: os.PathLike | str | None = None) -> Path:
        return Path(self.cls_labels.format(root=root if root is not None else self.default_root))

    def stage_defaults(self, stage: str) -> dict[str, Any]:
        """This dataset's settings of ``stage`` that differ from the VOC defaults (a copy; may be empty)."""
        return dict(self.defaults.get(stage, {}))


def get_dataset(name: "str | DatasetInfo") -> DatasetInfo:
    """The descriptor called ``name`` (a :data:`DATASET_NAMES` entry); a descriptor is returned as is."""
    if isinstance(name, DatasetInfo):
        return name
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASET_NAMES)}.")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


class DatasetArgumentParser(argparse.ArgumentParser):
    """An argument parser for a stage with ``--dataset``: after parsing it calls ``fill(namespace)``
    (usually a :func:`fill_dataset_defaults` wrapper), so flags left at None get the chosen dataset's
    defaults and ``parse_args([])`` shows the VOC paths, as the reference's parsers did.

    With ``stage`` set, the chosen dataset's :meth:`DatasetInfo.stage_defaults` replace the parser's own
    defaults for that parse (COCO's epochs, thresholds, ...); flags given on the command line still win."""

    def __init__(self, *args, fill: Callable[[argparse.Namespace], object] | None = None,
                 stage: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fill = fill
        self.stage = stage

    def parse_known_args(self, args=None, namespace=None):
        overrides = self._dataset_overrides(args)
        saved = {k: self.get_default(k) for k in overrides}
        self.set_defaults(**overrides)
        try:
            ns, rest = super().parse_known_args(args, namespace)
        finally:
            self.set_defaults(**saved)  # the parser object stays the VOC one for the next parse
        if self.fill is not None:
            self.fill(ns)
        return ns, rest

    def _dataset_overrides(self, args) -> dict[str, Any]:
        if self.stage is None:
            return {}
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--dataset", default=DEFAULT_DATASET)  # no choices: the full parse reports a bad name
        known, _ = pre.parse_known_args(args)
        if known.dataset not in _REGISTRY:
            return {}
        out = get_dataset(known.dataset).stage_defaults(self.stage)
        unknown = set(out) - {a.dest for a in self._actions}
        if unknown:  # a descriptor naming a flag this stage does not have is a bug, not a user error
            raise ValueError(f"dataset {known.dataset}: {self.stage} defaults name unknown flags {sorted(unknown)}")
        return out


def add_dataset_arg(parser, default: str = DEFAULT_DATASET) -> None:
    """``--dataset voc12|coco14`` on a stage's argument parser (the value stays the name)."""
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=default,
                        help="dataset descriptor: classes, palette, folder layout and default lists "
                             "(tools/dataset.py)")


#: Roles :func:`fill_dataset_defaults` understands: each maps a descriptor to a default path string.
_ROLES: dict[str, Callable[[DatasetInfo, str], str]] = {
    "root": lambda ds, root: ds.default_root,
    "cls_labels": lambda ds, root: str(ds.cls_labels_path(root)),
    "train_list": lambda ds, root: str(ds.list_path(ds.train_list, root)),
    "seed_list": lambda ds, root: str(ds.list_path(ds.seed_list, root)),
    "val_list": lambda ds, root: str(ds.list_path(ds.val_list, root)),
    "gt_dir": lambda ds, root: str(ds.gt_dir(root)),
    "aug_gt_dir": lambda ds, root: str(ds.gt_dir(root, aug=True)),
}


def fill_dataset_defaults(args, root: str, **fields: str) -> DatasetInfo:
    """Give every flag of ``args`` left at None its dataset default; return the descriptor.

    ``args.dataset`` names the dataset (voc12 when the namespace has none); ``root`` is the attribute
    holding the data root (filled first, from the descriptor's default root); ``fields`` maps further
    attribute names to roles (``cls_labels``, ``train_list``, ``seed_list``, ``val_list``, ``gt_dir``,
    ``aug_gt_dir``). Flags the user gave are kept. Idempotent: a stage's CLI and its library
    function may both call it.
    """
    ds = dataset_of(args)
    if getattr(args, root, None) is None:
        setattr(args, root, ds.default_root)
    for attr, role in fields.items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, _ROLES[role](ds, getattr(args, root)))
    return ds


def dataset_of(args) -> DatasetInfo:
    """The descriptor named by ``args.dataset`` (voc12 for a namespace or settings object without one)."""
    return get_dataset(getattr(args, "dataset", None) or DEFAULT_DATASET)
