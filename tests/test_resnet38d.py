"""Net_gpp: reference keys, strict load of generated weights, forward parity, freezing rules."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import shared_path
from models.resnet38d import Net_gpp


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _generated_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(shared_path("reference")))
    import weights  # noqa: E402  (shared, numpy-only)

    rows = weights.load_keys(str(shared_path("reference", "stage1", "net_gpp_keys.json")))
    return {k: torch.from_numpy(v) for k, v in weights.make_state_dict(rows, seed).items()}


@pytest.fixture(scope="module")
def ref_net() -> Net_gpp:
    net = Net_gpp()
    from tools.checkpoint import load_state_dict_checked

    load_state_dict_checked(net, _generated_state_dict(0), strict=True, what="generated weights")
    return net.eval()


def test_keys_shapes_dtypes_match_reference(ref_net: Net_gpp) -> None:
    rows = json.loads(shared_path("reference", "stage1", "net_gpp_keys.json").read_text())
    sd = ref_net.state_dict()
    assert len(sd) == len(rows)
    assert [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()] == \
        [(r[0], list(r[1]), r[2]) for r in rows]
    params = dict(ref_net.named_parameters())
    assert sum(p.numel() for p in params.values()) == sum(int(np.prod(r[1])) for r in rows if r[0] in params)
    # the ImageNet file initialises exactly the backbone: every fixture key but the heads' and BN counters
    from models.mxnet_params import resnet38_backbone_shapes

    assert {k: tuple(sd[k].shape) for k in ref_net.backbone_keys()} == \
        {k: tuple(s) for k, s in resnet38_backbone_shapes().items()}


def test_forward_matches_fixture(ref_net: Net_gpp) -> None:
    f = np.load(shared_path("reference", "stage1", "net_gpp_forward.npz"))
    with torch.no_grad():
        for suffix, x in (("", f["x"]), ("_b2", f["x_b2"])):
            outs = ref_net(torch.from_numpy(x))
            for name, got in zip(("cam", "out", "gpp", "cam_seg"), outs):
                ref = f[name + suffix]
                assert tuple(got.shape) == ref.shape, name + suffix
                assert _rel(got.numpy(), ref) < 1e-4, name + suffix
            # forward_cam (used by IRN make_cam) is the same raw CAM without the GPP head.
            if suffix == "":
                assert torch.equal(ref_net.forward_cam(torch.from_numpy(x)), outs[0])


def test_strict_load_rejects_wrong_keys() -> None:
    from tools.checkpoint import CheckpointKeyError, load_state_dict_checked

    sd = Net_gpp(width=0.0625).state_dict()
    sd.pop("bn8.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as e:
        load_state_dict_checked(Net_gpp(width=0.0625), sd, strict=True)
    assert "bn8.weight" in str(e.value) and "extra.weight" in str(e.value)


def test_train_override_freezes_like_reference() -> None:
    opt = json.loads(shared_path("reference", "stage1", "optimizer.json").read_text())
    net = Net_gpp(width=0.0625)
    # get_parameter_groups before the first .train(): all 51 conv weights in group 0.
    names = {id(p): n for n, p in net.named_parameters()}
    groups = net.get_parameter_groups()
    assert [names[id(p)] for p in groups[0]] == opt["groups"][0]["param_names"]
    assert all(len(g) == 0 for g in groups[1:])
    for mode in (True, False):
        net.train(mode)
        assert [n for n, _ in net.trainable_named_parameters()] == opt["requires_grad_after_train"]
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        assert frozen == opt["frozen_after_train"]
        assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.b6.dropout_2b1.training is False
    net.train()
    assert net.b6.dropout_2b1.training is True


def test_small_width_shapes_and_grad() -> None:
    net = Net_gpp(width=0.0625).train()
    x = torch.randn(2, 3, 41, 50)
    cam, out, gpp, cam_seg = net(x)
    assert cam.shape == (2, 20, 6, 7) and out.shape == (2, 20)
    assert gpp.shape == cam.shape and cam_seg.shape == (2, 21, 6, 7)
    out.sum().backward()
    assert net.conv1a.weight.grad is None and net.b3.conv_branch2a.weight.grad is not None


def test_scratch_options_train_bn_and_stem() -> None:
    net = Net_gpp(width=0.0625, train_bn=True, train_stem=True)
    groups = net.get_parameter_groups()
    n_bn = sum(1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)) - 1  # bn8 is dead
    assert len(groups[0]) == 51 and len(groups[1]) == 2 * n_bn
    net.train()
    assert net.conv1a.weight.requires_grad and net.b2.bn_branch2a.weight.requires_grad
    assert net.b3.bn_branch2a.training
    assert list(net.state_dict()) == list(Net_gpp(width=0.0625).state_dict())
