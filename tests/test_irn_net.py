"""IRN network (edge/displacement heads, EdgeDisplacement, AffinityDisplacementLoss) vs
``stage2/irn_forward.npz`` / ``irn_loss.npz``, and strict loading of reference key layouts."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from irn.net.resnet50_irn import (AffinityDisplacementLoss, EdgeDisplacement, Net, canonical_state_dict,
                                  load_irn_weights)
from irn.path_index import PathIndex, affinity_labels
from irn.steps.train_irn import irn_total_loss
from tools.checkpoint import CheckpointKeyError
from conftest import REFERENCE

SHARED = Path(__file__).resolve().parents[2] / "shared"
ST2 = REFERENCE / "stage2"


def _need(p: Path) -> Path:
    if not p.exists():
        pytest.skip(f"missing shared file {p}")
    return p


def _weights_module():
    spec = importlib.util.spec_from_file_location("ref_weights", _need(REFERENCE / "weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def canonical_sd():
    rows = json.loads(_need(ST2 / "irn_keys.json").read_text())
    sd = _weights_module().make_state_dict(rows, seed=0)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def reference_sd(canonical_sd):
    """What a reference res50_irn.pth holds: every alias + the 512-crop loss buffers."""
    aliases = json.loads(_need(ST2 / "irn_state_dict_aliases.json").read_text())
    sd = {key: canonical_sd[canon] for key, _, _, canon in aliases["state_dict"]}
    for key, shape, dtype in aliases["affinity_loss_extra_buffers_crop512_radius10"]:
        sd[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return sd


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_state_dict_keys_match_reference():
    aliases = json.loads(_need(ST2 / "irn_state_dict_aliases.json").read_text())
    rows = aliases["state_dict"]
    net = Net()
    sd = net.state_dict()
    assert list(sd.keys()) == [r[0] for r in rows]
    for key, shape, _, _ in rows:
        assert list(sd[key].shape) == shape, key
    canon = canonical_state_dict(net)
    ref_canon = [r[0] for r in json.loads((ST2 / "irn_keys.json").read_text())]
    assert sorted(canon) == sorted(ref_canon)
    # the loss module adds exactly the reference buffers for a 512 crop
    loss = AffinityDisplacementLoss(PathIndex(radius=10, default_size=(128, 128)))
    extra = {k: list(v.shape) for k, v in loss.state_dict().items() if k not in sd}
    assert extra == {k: s for k, s, _ in aliases["affinity_loss_extra_buffers_crop512_radius10"]}


def test_forward_matches_reference(canonical_sd, reference_sd):
    ref = np.load(_need(ST2 / "irn_forward.npz"))
    net = Net()
    load_irn_weights(net, reference_sd)  # full reference layout incl. loss buffers, strict otherwise
    x = torch.from_numpy(ref["x"])
    with torch.no_grad():
        net.eval()
        edge, dp = net(x)
        assert _rel(edge, ref["edge_out"]) < 1e-5 and _rel(dp, ref["dp_out"]) < 1e-5
        net.train()
        assert not net.backbone[0][1].training  # backbone stays in eval mode
        edge, dp = net(x)
        assert _rel(edge, ref["edge_out_train"]) < 1e-5 and _rel(dp, ref["dp_out_train"]) < 1e-5
    ed = EdgeDisplacement(crop_size=int(ref["ed_crop_size"]), stride=4)
    load_irn_weights(ed, canonical_sd)  # canonical keys only
    ed.eval()
    with torch.no_grad():
        e, d = ed(torch.from_numpy(ref["x_pair"]))
    assert e.shape == ref["ed_edge"].shape and d.shape == ref["ed_dp"].shape
    assert _rel(e, ref["ed_edge"]) < 1e-5 and _rel(d, ref["ed_dp"]) < 1e-5


def test_loading_rejects_wrong_keys(canonical_sd):
    net = Net()
    bad = dict(canonical_sd)
    bad.pop("fc_edge6.bias")
    with pytest.raises(CheckpointKeyError, match="fc_edge6.bias"):
        load_irn_weights(net, bad)
    bad = dict(canonical_sd)
    bad["fc_edge7.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="fc_edge7"):
        load_irn_weights(net, bad)


def test_affinity_displacement_loss_matches_reference(canonical_sd):
    ref = np.load(_need(ST2 / "irn_loss.npz"))
    pi = PathIndex(radius=int(ref["radius"]), default_size=tuple(ref["feat_size"]))
    model = AffinityDisplacementLoss(pi)
    load_irn_weights(model, canonical_sd)
    model.train()
    np.testing.assert_array_equal(model.disp_target.numpy(), ref["disp_target"])
    bg, fg, neg = (torch.from_numpy(a)[None] for a in affinity_labels(ref["label_reduced"], pi.src_indices,
                                                                          pi.dst_indices))
    for name, t in (("aff_bg_pos", bg), ("aff_fg_pos", fg), ("aff_neg", neg)):
        np.testing.assert_array_equal(t.numpy(), ref[name])
    with torch.no_grad():
        pos, negl, dpf, dpb = model(torch.from_numpy(ref["x"]), True)
    for name, t in (("pos_aff_loss", pos), ("neg_aff_loss", negl), ("dp_fg_loss", dpf), ("dp_bg_loss", dpb)):
        assert _rel(t, ref[name]) < 1e-5, name
    parts = irn_total_loss(pos, negl, dpf, dpb, bg, fg, neg)
    for name in ("loss_bg_pos", "loss_fg_pos", "loss_pos", "loss_neg", "loss_dp_fg", "loss_dp_bg", "loss_total"):
        assert abs(float(parts[name]) - float(ref[name])) <= 1e-5 * max(1.0, abs(float(ref[name]))), name
