"""The MS COCO 2014 descriptor (:class:`tools.dataset.DatasetInfo`): 80 classes plus background.

Class index k (1..80) is the k-th COCO category in ascending category id (person = id 1 -> 1, ...,
toothbrush = id 90 -> 80; the ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused). Images are
``<root>/{train2014,val2014}/<id>.jpg`` and masks ``<root>/SegmentationClass/{train2014,val2014}/<id>.png``
for ids such as ``COCO_train2014_000000000009`` (the split is the id's second field). The lists
``train.txt``, ``val.txt``, ``val_part.txt`` and ``cls_labels.npy`` are written under the COCO root by
``coco14/prepare.py``.
"""
from __future__ import annotations

from tools.dataset import DatasetInfo
from tools.errors import DataError

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: The COCO category id of each class, in class-index order (class k has id COCO_CATEGORY_IDS[k - 1]).
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

SPLITS = ("train2014", "val2014")

#: COCO's settings where they differ from the VOC defaults of the stages' parsers (the choices and their
#: sources: docs/deviations.md, "COCO 2014"). Stage one: the VOC schedule's number of optimisation steps
#: (40 epochs of 10,582 images, 10 at batch 8 then 30 at batch 16, about 33k steps) on 82,081 images: one
#: epoch at batch 8 and four at batch 16 (about 31k steps); no in-training validation (the train list is
#: scored by infer.py + evaluation.py right after). IRN: ReCAM / BECO's COCO foreground threshold. BECO: its
#: COCO config file (relative to segmentation/).
COCO_STAGE_DEFAULTS = {
    "train": {"max_epochs": 5, "T": 1, "val_epochs": "none"},
    "run_sample": {"conf_fg_thres": 0.35},
    "beco": {"config": "configs/beco_deeplabv2_coco.json"},
}


def coco_split(img_id: str) -> str:
    """``COCO_train2014_000000000009`` -> ``train2014`` (the folder holding its image and mask)."""
    parts = img_id.split("_")
    if len(parts) == 3 and parts[1] in SPLITS:
        return parts[1]
    raise DataError(f"image id '{img_id}' is not a COCO 2014 name such as COCO_train2014_000000000009; "
                    "the COCO lists written by coco14/prepare.py hold such names (check --dataset and the list).")


COCO14 = DatasetInfo(
    name="coco14",
    class_names=COCO_CLASSES,
    default_root="data/COCO2014",
    lists={"train": "{root}/train.txt", "val": "{root}/val.txt", "val_part": "{root}/val_part.txt"},
    train_list="train",
    seed_list="train",
    val_list="val",
    cls_labels="{root}/cls_labels.npy",
    root_hint=("Download train2014.zip, val2014.zip and annotations_trainval2014.zip from https://cocodataset.org "
               "and extract them into <root> (<root>/train2014, <root>/val2014, <root>/annotations), "
               "then run: python coco14/prepare.py --coco_root <root>"),
    labels_hint="Build it with: python coco14/prepare.py --coco_root <COCO root> (writes the lists and "
                "cls_labels.npy under the COCO root).",
    image_folder="",
    image_ext=".jpg",
    gt_folder="SegmentationClass",
    aug_gt_folder="SegmentationClass",
    subfolder=coco_split,
    defaults=COCO_STAGE_DEFAULTS,
)
