"""The PASCAL VOC 2012 descriptor (:class:`tools.dataset.DatasetInfo`): 20 classes plus background,
``<root>/JPEGImages/<id>.jpg``, ``<root>/SegmentationClass[Aug]/<id>.png``, the lists and labels of
the repository's ``voc12/`` folder. The only place that states VOC's class count."""
from __future__ import annotations

from tools.dataset import DatasetInfo

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

VOC12 = DatasetInfo(
    name="voc12",
    class_names=VOC_CLASSES,
    default_root="data/VOC2012",
    lists={"train_aug": "voc12/train_aug.txt", "train": "voc12/train.txt", "val": "voc12/val.txt"},
    train_list="train_aug",
    seed_list="train",
    val_list="val",
    cls_labels="voc12/cls_labels.npy",
    root_hint=("Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and "
               "extract it so that <root>/JPEGImages exists (or pass --data_root / --voc12_root); for a quick "
               "start make the toy set: python -m voc12.toy --out data/toy"),
    labels_hint=("Build it with: python voc12/prepare.py --voc_root <VOC root> (writes voc12/cls_labels.npy and "
                 "the lists)."),
    named_list_folder="{root}/ImageSets/Segmentation",
    image_folder="JPEGImages",
    image_ext=".jpg",
    gt_folder="SegmentationClass",
    aug_gt_folder="SegmentationClassAug",
)
