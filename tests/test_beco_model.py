"""BECO stage parity: DeepLabV2 keys/forward/MSC test path, checkpoint layout, ImageNet key mapping,
SimSegMetrics / test.py scores, BECO test.py CRF, and the BECO training-step pieces."""
from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from conftest import REFERENCE, shared_path

from segmentation.beco.deeplabv2 import DeepLabV2, ResNetBackbone, build_deeplabv2, imagenet_to_backbone_keys, load_imagenet_backbone
from segmentation.beco.model import BECO, BECOSettings, beco_losses, boundary_map, class_mix_batch
from tools.checkpoint import CheckpointKeyError
from tools.metrics import confusion_matrix, present_class_scores, scores

ST2 = REFERENCE / "stage2"




def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _weights():
    sys.path.insert(0, str(REFERENCE))
    from weights import make_state_dict  # shared reference helper, read-only

    return make_state_dict


@pytest.fixture(scope="module")
def keys():
    return json.loads(shared_path("reference", "stage2", "deeplabv2_keys.json").read_text())


@pytest.fixture(scope="module")
def beco_ref(keys):
    make_state_dict = _weights()
    nets = []
    for seed in (0, 1):
        net = DeepLabV2()
        sd = {k: torch.from_numpy(v) for k, v in make_state_dict(keys, seed).items()}
        net.load_state_dict(sd, strict=True)
        nets.append(net)
    return BECO(nets[0], nets[1], BECOSettings()).eval()


def test_deeplabv2_keys_shapes_order(keys):
    with torch.device("meta"):
        sd = DeepLabV2().state_dict()
    assert list(sd) == [k for k, _, _ in keys]
    for k, shape, dtype in keys:
        assert list(sd[k].shape) == shape, k
        assert str(sd[k].dtype).replace("torch.", "") == dtype, k
    assert sum(v.numel() for v in sd.values()) == sum(int(np.prod(s)) for _, s, _ in keys)


def test_deeplabv2_forward_and_beco_msc(beco_ref):
    d = np.load(shared_path("reference", "stage2", "deeplabv2_forward.npz"))
    x = torch.from_numpy(d["x"])
    with torch.no_grad():
        o1, o2 = beco_ref.network1(x), beco_ref.network2(x)
    assert rel_err(o1[4], d["feat_layer4"]) < 1e-4
    assert rel_err(o1["pre_logits"], d["pre_logits"]) < 1e-4
    assert rel_err(o1["logits"], d["logits"]) < 1e-4
    assert rel_err(o2["pre_logits"], d["net2_pre_logits"]) < 1e-4
    assert tuple(o1["pre_logits"].shape) == d["pre_logits"].shape
    # the two-net test path; its 1.0-scale pass is reused from the plain forward (same input, same nets)
    full = tuple(d["x"].shape[-2:])
    calls = []
    orig = beco_ref.network1.forward

    def counting(inp):
        calls.append(tuple(inp.shape[-2:]))
        return o1 if tuple(inp.shape[-2:]) == full else orig(inp)

    beco_ref.network1.forward = counting
    o2_fwd = beco_ref.network2.forward
    beco_ref.network2.forward = lambda inp: o2 if tuple(inp.shape[-2:]) == full else o2_fwd(inp)
    try:
        logits, pre_msc = beco_ref.test_forward(x)
        beco_ref.settings.test_msc = False
        _, pre = beco_ref.test_forward(x)
    finally:
        beco_ref.settings.test_msc = True
        del beco_ref.network1.forward, beco_ref.network2.forward
    # the plain size first, then each other scale in scale_factor form (output side = floor(side * s))
    scaled = [tuple(int(np.floor(n * float(s))) for n in full) for s in d["beco_msc_scales"] if float(s) != 1.0]
    assert calls[:1 + len(scaled)] == [full, *scaled]
    assert list(np.asarray(d["beco_msc_scales"])) == list(beco_ref.settings.msc_scales)
    assert rel_err(logits, d["beco_logits_avg"]) < 1e-4
    assert rel_err(pre_msc, d["beco_pre_logits_msc"]) < 1e-4
    assert rel_err(pre, d["beco_pre_logits_avg"]) < 1e-4


def test_released_checkpoint_layout_loads_strictly(keys, tmp_path):
    """A best_ckpt_752.pth-shaped file ({'net_state_dict': {'network1', 'network2'}}) loads strictly
    through main.py's loader; a wrong key is named in the error."""
    from segmentation.beco.engine import load_nets
    from tools.checkpoint import load_torch_file

    sd = {k: torch.full(s, 0.5 if dt.startswith("float") else 0, dtype=getattr(torch, dt)) if s else
          torch.tensor(3, dtype=getattr(torch, dt)) for k, s, dt in keys}
    path = tmp_path / "best_ckpt_752.pth"
    torch.save({"net_state_dict": {"network1": sd, "network2": sd}}, path)
    model = BECO(DeepLabV2(), DeepLabV2(), BECOSettings(mix_aug=False))
    load_nets(model, load_torch_file(path, "ckpt"), str(path))
    assert float(model.network2.aspp.c3.weight.detach().flatten()[0]) == 0.5
    bad = dict(sd)
    bad["aspp.c4.weight"] = bad.pop("aspp.c3.weight")
    with pytest.raises(CheckpointKeyError, match="aspp.c3.weight"):
        load_nets(model, {"net_state_dict": {"network1": bad}}, "bad.pth")
    with pytest.raises(Exception, match="net_state_dict"):
        load_nets(model, {"state_dict": sd}, "plain.pth")


def test_imagenet_key_mapping(tmp_path):
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.resnet101().state_dict()
        own = ResNetBackbone("resnet101").state_dict()
    mapped = imagenet_to_backbone_keys(tv)
    assert "stem_layer.conv1.weight" in mapped and "stem_layer.bn1.running_var" in mapped
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in mapped)
    assert set(mapped) == {k for k in own if not k.endswith("num_batches_tracked")}
    # real load on a small torchvision model: values land where they should, counters are 0
    tv18 = torchvision.models.resnet18()
    torch.save(tv18.state_dict(), tmp_path / "r18.pth")
    bb = ResNetBackbone("resnet18")
    load_imagenet_backbone(bb, tmp_path / "r18.pth", "resnet18")
    assert torch.equal(bb.stem_layer.conv1.weight, tv18.conv1.weight)
    assert torch.equal(bb.layer4[1].bn2.running_var, tv18.layer4[1].bn2.running_var)
    assert int(bb.layer1[0].bn1.num_batches_tracked) == 0
    with pytest.raises(FileNotFoundError, match="resnet-101_v2|resnet101-cd907fc2"):
        build_deeplabv2(pretrained=tmp_path / "missing.pth")


def test_small_backbone_shapes(one_thread):
    net = build_deeplabv2(backbone="resnet18", width=8)
    with torch.no_grad():
        o = net(torch.zeros(2, 3, 97, 129))
    assert o["pre_logits"].shape == (2, 21, 13, 17) and o["logits"].shape == (2, 21, 97, 129)


def test_seg_metrics_fixture():
    d = json.loads(shared_path("reference", "stage2", "seg_metric.json").read_text())
    hist = sum(confusion_matrix(np.array(p["pred"]), np.array(p["gt"]), 21, 255) for p in d["pairs"])
    ref = d["beco_SimSegMetrics"]
    assert (hist == np.array(ref["confusion_matrix"])).all()
    s = present_class_scores(hist)
    for a, b in [("overall_acc", "Overall_Acc"), ("mclass_acc", "mClass_Acc"), ("mpred_acc", "mPred_Acc"),
                 ("miou", "mIoU")]:
        assert abs(s[a] - ref[b]) < 1e-7, a
    for a, b in [("class_acc", "Class_Acc"), ("pred_acc", "Pred_Acc"), ("iou", "IoU")]:
        assert np.abs(s[a] - np.array(ref[b], np.float64)).max() < 1e-7, a
    t = d["beco_test_py_scores"]
    sc, s0 = scores(hist), present_class_scores(hist, eps=0.0)
    assert abs(s0["miou"] - t["Mean IoU"]) < 1e-7
    assert abs(sc["pixel_acc"] - t["Pixel Accuracy"]) < 1e-7
    assert abs(sc["mean_acc"] - t["Mean Accuracy"]) < 1e-7
    assert abs(sc["fw_iou"] - t["Frequency Weighted IoU"]) < 1e-7
    for c, v in enumerate(t["Class IoU"]):
        if v is not None:
            assert abs(s0["iou"][c] - v) < 1e-7


def test_metric_line_format():
    from segmentation.beco.engine import metric_line

    line = metric_line({"overall_acc": 0.123456789, "mclass_acc": 0.5, "mpred_acc": 0.25, "miou": 0.75})
    assert line == "Overall_Acc:0.12346, mClass_Acc:0.5, mPred_Acc:0.25, mIoU:0.75, "


def test_crf_fixture():
    pytest.importorskip("pydensecrf.densecrf")
    from segmentation.beco.postprocess import CRF_PARAMS, logits_to_prob, predict_one, wrapped_meansub_uint8
    from tools.crf import dense_crf_softmax

    crf = json.loads(shared_path("reference", "stage2", "crf.json").read_text())["beco_test_py"]
    assert CRF_PARAMS == dict(n_iter=crf["iter_max"], gauss_sxy=crf["gaussian"]["sxy"],
                              gauss_compat=crf["gaussian"]["compat"], bil_sxy=crf["bilateral"]["sxy"],
                              bil_srgb=crf["bilateral"]["srgb"], bil_compat=crf["bilateral"]["compat"])
    d = np.load(ST2 / "crf_outputs.npz")
    img = d["img"]
    assert np.array_equal(wrapped_meansub_uint8(img), d["beco_img_as_passed"])
    prob = logits_to_prob(d["beco_logits"], img.shape[:2])
    assert np.abs(prob - d["beco_prob"]).max() < 1e-6
    q = dense_crf_softmax(wrapped_meansub_uint8(img), prob, **CRF_PARAMS)
    assert np.abs(q - d["beco_Q"]).max() < 1e-6
    q_clean = dense_crf_softmax(img, prob, **CRF_PARAMS)
    assert np.abs(q_clean - d["beco_Q_unwrapped_img"]).max() < 1e-6
    assert np.array_equal(predict_one(d["beco_logits"], img, True, "wrapped"), d["beco_Q"].argmax(0))
    assert np.array_equal(predict_one(d["beco_logits"], img, True, "clean"), d["beco_Q_unwrapped_img"].argmax(0))
    # upsampling from a coarse map goes through the same chain
    assert predict_one(d["beco_logits"][:, ::4, ::4], img, False).shape == img.shape[:2]


# ------------------------------------------------------------------------------- training-step pieces
def _toy_batch(b=4, h=16, w=16):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, 3, h, w, generator=g)
    label = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):
        label[i, 2 + i:8 + i, 3:9] = i + 1      # class i+1 square
        label[i, 12:, 12:] = 255                 # ignored corner
    mask = torch.ones(b, h, w, dtype=torch.long)
    mask[:, :, :2] = 0
    return img, label, mask


def test_class_mix_warmup_pairs_and_labels():
    img, label, mask = _toy_batch()
    st = BECOSettings(mix_prob=1.0)
    random.seed(0)
    np.random.seed(0)
    x, y, m, bd = class_mix_batch(img, label, mask, st, warm=True)
    # order: [mix(0<-2), mix(2<-0), mix(1<-3), mix(3<-1)]
    for out, (tgt, src) in enumerate([(0, 2), (2, 0), (1, 3), (3, 1)]):
        a = label[src] == src + 1                # the source's only fg class is pasted
        assert torch.equal(y[out][a], label[src][a]) and torch.equal(y[out][~a], label[tgt][~a])
        assert torch.allclose(x[out][:, a], img[src][:, a]) and torch.allclose(x[out][:, ~a], img[tgt][:, ~a])
        assert torch.equal(m[out][a], mask[src][a])
    assert float(bd.abs().sum()) == 0.0
    # probability 0: the batch comes back in pair order, unchanged
    x0, y0, _, _ = class_mix_batch(img, label, mask, BECOSettings(mix_prob=0.0), warm=True)
    assert torch.equal(y0, label[[0, 2, 1, 3]]) and torch.equal(x0, img[[0, 2, 1, 3]])


def test_class_mix_after_warmup_uses_online_labels_and_boundary():
    img, label, mask = _toy_batch(2)
    on_lab = torch.zeros_like(label)
    on_lab[1, 4:10, 4:10] = 7
    on_conf = torch.ones_like(mask)
    random.seed(0)
    x, y, m, bd = class_mix_batch(img, label, mask, BECOSettings(mix_prob=1.0), False, on_lab, on_conf)
    alpha = (on_lab[1] == 7).numpy().astype(np.uint8)
    assert torch.equal(y[0], torch.where(torch.from_numpy(alpha).bool(), on_lab[1], on_lab[0]))
    expect = boundary_map(alpha, 1)
    assert np.array_equal(bd[0].numpy(), expect.astype(np.float32))
    assert expect.sum() == 8 * 8 - 4 * 4        # 3x3 dilate minus erode of a 6x6 square: a 2-px ring
    assert torch.equal(y[1], on_lab[1])          # source 0 has no confident fg class: nothing pasted
    assert float(bd[1].sum()) == 0.0


def test_beco_losses_by_hand():
    torch.manual_seed(0)
    l1, l2 = torch.randn(2, 21, 4, 5), torch.randn(2, 21, 4, 5)
    y = torch.randint(0, 21, (2, 4, 5))
    y[0, 0, 0] = 255
    m = torch.randint(0, 2, (2, 4, 5))
    bd = torch.randint(0, 2, (2, 4, 5)).float()
    out = beco_losses(l1, l2, y, m, bd, BECOSettings())
    ce = torch.nn.functional.cross_entropy
    exp_ce1 = (ce(l1, y, ignore_index=255, reduction="none") * m * (1 + 0.2 * bd)).sum() / m.numel()
    exp_cot2 = (ce(l2, l1.argmax(1), reduction="none") * (1 - m)).sum() / m.numel()
    assert torch.allclose(out["loss_ce1"], exp_ce1) and torch.allclose(out["loss_cot2"], exp_cot2)
    assert torch.allclose(out["loss"], out["loss_ce1"] + out["loss_ce2"] + out["loss_cot1"] + out["loss_cot2"])


def test_train_step_runs_with_strong_aug_and_online_labels(one_thread):
    nets = [build_deeplabv2(backbone="resnet18", width=8) for _ in range(2)]
    model = BECO(nets[0], nets[1], BECOSettings(warm_up=0, mix_prob=1.0))
    img, label, mask = _toy_batch(4, 32, 32)
    out = model.train_step(img, label, mask)
    out["loss"].backward()
    assert math.isfinite(float(out["loss"].detach())) and nets[0].aspp.c0.weight.grad is not None
    assert nets[0].training and nets[1].training


def test_random_resized_crop_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    from PIL import Image
    from segmentation.beco.datasets import random_resized_crop_params

    for (h, w), scale in [((97, 129), (0.5, 0.75)), ((40, 300), (0.5, 0.75)), ((500, 375), (0.08, 1.0))]:
        img = Image.new("RGB", (w, h))
        for seed in range(30):
            torch.manual_seed(seed)
            ref = tv.transforms.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            torch.manual_seed(seed)
            assert random_resized_crop_params(h, w, scale, (3 / 4, 4 / 3)) == tuple(ref)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 83, 3), dtype=np.uint8))
    from segmentation.beco.datasets import _resized_crop
    ref = tv.transforms.functional.resized_crop(img, 5, 7, 40, 50, [32, 32], tv.transforms.InterpolationMode.BILINEAR)
    assert np.array_equal(np.asarray(_resized_crop(img, 5, 7, 40, 50, 32, Image.BILINEAR)), np.asarray(ref))


def test_amp_bf16_cpu_step(one_thread):
    """--amp on CPU: bf16 autocast, no GradScaler; the losses stay float32 and finite."""
    from segmentation.beco.engine import build_optimizer, train_step
    from tools.runtime import amp_setup

    ac, scaler = amp_setup(torch.device("cpu"), True, "auto")
    assert scaler is None
    torch.manual_seed(0)
    nets = [build_deeplabv2(backbone="resnet18", width=8) for _ in range(2)]
    model = BECO(nets[0], nets[1], BECOSettings(warm_up=0, mix_aug=False))
    img, label, mask = _toy_batch(2, 32, 32)
    before = nets[0].aspp.c0.weight.detach().clone()
    out = train_step(model, build_optimizer(model, 0.01, 0.9, 1e-4), img, label, mask, ac, scaler)
    assert out["loss"].dtype == torch.float32 and math.isfinite(float(out["loss"].detach()))
    assert not torch.equal(before, nets[0].aspp.c0.weight)


def test_config_file_overlay_and_cli_precedence(tmp_path):
    from segmentation.beco.config import DEFAULT_CONFIG, SEG_DIR, parse_args
    from tools.errors import WSSSError

    a = parse_args([])
    ref = json.loads(DEFAULT_CONFIG.read_text())
    assert (a.batch_size, a.max_epoch, a.warm_up, a.lr, a.backbone) == (16, 100, 2, 0.01, "resnet101")
    assert a.msc_scales == [0.75, 1.0, 1.25] and a.test_msc is True and a.crop_scale == [0.5, 0.75]
    assert a.pretrained == str(SEG_DIR / ref["network"]["pretrained"])  # config paths: relative to segmentation/
    t = parse_args(["--config", str(SEG_DIR / "configs" / "toy.json"), "--lr", "0.1", "--mask_dir", "none",
                    "--pseudo_label_dir", "gt_dir", "--test_msc", "false"])
    assert (t.backbone, t.backbone_width, t.batch_size, t.lr, t.pretrained) == ("resnet18", 16, 8, 0.1, None)
    assert t.mask_dir is None and t.sem_seg_dir == "gt_dir" and t.test_msc is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runner": {"max_epochs": 3}}))
    with pytest.raises(WSSSError, match="max_epochs"):
        parse_args(["--config", str(bad)])
