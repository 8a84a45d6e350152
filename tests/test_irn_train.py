"""train_irn options: reference momentum-slot default vs --irn_fix_momentum, the ImageNet-weights
error, EdgeDisplacement on images larger than the crop, and the seed-crop helper."""
import random
from argparse import Namespace

import numpy as np
import pytest
import torch

from irn.data import crop_image_and_label
from irn.net.resnet50_irn import EdgeDisplacement
from irn.steps.train_irn import _optimizer, build_model
from tools.errors import MissingFileError


def _args(**kw):
    base = dict(irn_crop_size=96, irn_backbone_width=8, irn_backbone_init="none", irn_learning_rate=0.1,
                irn_weight_decay=1e-4, irn_fix_momentum=False)
    base.update(kw)
    return Namespace(**base)


def test_optimizer_reference_momentum_slot_and_fix():
    model = build_model(_args())
    opt = _optimizer(model, _args())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    opt = _optimizer(model, _args(irn_fix_momentum=True))
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    edge, dp = model.trainable_parameters()
    assert len(edge) == 17 and len(dp) == 22  # heads only; the backbone is not optimised


def test_missing_imagenet_weights_names_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(MissingFileError) as e:
        build_model(_args(irn_backbone_width=64, irn_backbone_init=str(tmp_path / "resnet50-19c8e357.pth")))
    assert "resnet50-19c8e357.pth" in str(e.value) and "https://download.pytorch.org/models/" in str(e.value)


def test_edge_displacement_larger_than_crop():
    torch.manual_seed(0)
    ed = EdgeDisplacement(crop_size=32, backbone_width=8).eval()
    with torch.no_grad():
        edge, dp = ed(torch.randn(2, 3, 45, 50))
    assert edge.shape == (1, 12, 13) and dp.shape == (2, 12, 13)
    assert torch.all((edge > 0) & (edge < 1))


def test_crop_image_and_label_pads_255():
    img = np.ones((10, 12, 3), np.float32)
    lab = np.full((10, 12), 3, np.uint8)
    lab[0, 0] = 0
    ci, cl = crop_image_and_label(img, lab, 16, random.Random(0))
    assert ci.shape == (16, 16, 3) and cl.shape == (16, 16) and cl.dtype == np.uint8
    inside = ci[..., 0] == 1
    assert inside.sum() == 120 and (cl[~inside] == 255).all()
    assert set(np.unique(cl[inside])) == {0, 3}


def test_resume_after_an_interrupted_epoch_gives_the_same_weights(toy_voc, tmp_path, monkeypatch, one_thread):
    """train_irn stopped after its 2nd epoch and rerun with --resume ends with the very weights of an
    uninterrupted run: the .resume state holds the RNG states and the loader's shuffling generator."""
    import shutil

    from irn.data import AffinityDataset
    from irn.steps import train_irn

    ir = tmp_path / "ir_label"  # the toy ground truth stands in for IR labels
    shutil.copytree(toy_voc / "SegmentationClass", ir)
    ids = toy_voc / "lists" / "train.txt"

    def args(out):
        return Namespace(irn_weights_name=str(out), train_list=str(ids), infer_list=str(ids),
                         voc12_root=str(toy_voc), ir_label_out_dir=str(ir), irn_crop_size=96, irn_batch_size=2,
                         irn_num_epoches=3, irn_learning_rate=0.1, irn_weight_decay=1e-4, irn_fix_momentum=False,
                         irn_backbone_width=8, irn_backbone_init="none", seed=0, device="cpu", num_workers=0,
                         quiet=True, resume=True, overwrite=False)

    full = tmp_path / "full" / "res50_irn.pth"
    full.parent.mkdir()
    train_irn.run(args(full))

    cut = tmp_path / "cut" / "res50_irn.pth"
    cut.parent.mkdir()
    real_set_epoch = AffinityDataset.set_epoch

    def stop_at_2(self, ep):
        if ep == 2:
            raise KeyboardInterrupt
        real_set_epoch(self, ep)

    monkeypatch.setattr(AffinityDataset, "set_epoch", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        train_irn.run(args(cut))
    monkeypatch.setattr(AffinityDataset, "set_epoch", real_set_epoch)
    assert cut.with_name(cut.name + ".resume").is_file() and not cut.exists()
    train_irn.run(args(cut))
    a, b = torch.load(full, weights_only=True), torch.load(cut, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
