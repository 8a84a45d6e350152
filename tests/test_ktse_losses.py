"""KTSE loss pieces, refinement, one full training step and the optimizer vs the reference fixtures,
plus KTSE+ ALS unit tests on hand-built CAMs."""
from __future__ import annotations

import json
from pathlib import Path
import sys

import numpy as np
import pytest
import torch

from conftest import cli_module, shared_path
from models import ktse
from models.resnet38d import Net_gpp


def _rel(a, ref) -> float:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module")
def fx():
    return np.load(shared_path("reference", "stage1", "losses.npz"))


def _t(fx, k: str) -> torch.Tensor:
    return torch.from_numpy(fx[k])


def test_max_norm_and_denormalize(fx) -> None:
    assert _rel(ktse.max_norm(_t(fx, "maxnorm_in")).numpy(), fx["maxnorm_out"]) < 1e-4
    # uint8 truncation: must match exactly
    assert np.array_equal(ktse.denormalize_img2(_t(fx, "denorm_in")).numpy(), fx["denorm_out"])


@pytest.mark.parametrize("case", ["mixed", "simple", "complex"])
def test_get_seg_loss(fx, case: str) -> None:
    log: list = []
    ret = ktse.get_seg_loss(_t(fx, f"seg_{case}_pred"), _t(fx, f"seg_{case}_label"),
                            _t(fx, f"seg_{case}_cls_label"), _t(fx, f"seg_{case}_cam_fg"), log)
    got = np.array([float(r) for r in ret])
    assert _rel(got, fx[f"seg_{case}_out"]) < 1e-4
    assert _rel([float(v) for v in log], fx[f"seg_{case}_ce_calls"]) < 1e-4
    assert len(log) == len(fx[f"seg_{case}_ce_calls"])
    assert (ret[0] is ret[1]) == bool(fx[f"seg_{case}_bg_is_seg"])


def test_get_seg_loss2(fx) -> None:
    assert _rel(float(ktse.get_seg_loss2(_t(fx, "seg2_pred"), _t(fx, "seg2_label"))), fx["seg2_out"]) < 1e-4
    assert np.isnan(float(ktse.get_seg_loss2(_t(fx, "seg2_pred"), _t(fx, "seg2_nobg_label"))))
    # --safe_ce: the all-ignored background CE contributes 0 (only 0.0125 * fg CE remains)
    log: list = []
    safe = ktse.get_seg_loss2(_t(fx, "seg2_pred"), _t(fx, "seg2_nobg_label"), log, safe=True)
    assert float(log[0]) == 0.0 and float(safe) == pytest.approx(0.0125 * float(log[1]))


def test_refine_cams_with_bkg_v2(fx) -> None:
    out, par_outs = ktse.refine_cams_with_bkg_v2(ktse.build_par(), _t(fx, "refine_images"), _t(fx, "refine_cams"),
                                                 _t(fx, "refine_cls_labels"), return_par=True)
    assert np.array_equal(out.numpy(), fx["refine_out"])
    for i, p in enumerate(par_outs):
        assert _rel(p.numpy(), fx[f"refine_par_out{i}"]) < 1e-4


@pytest.fixture(scope="module")
def gen_weights():
    sys.path.insert(0, str(shared_path("reference")))
    import weights

    rows = weights.load_keys(str(shared_path("reference", "stage1", "net_gpp_keys.json")))
    return {k: torch.from_numpy(v) for k, v in weights.make_state_dict(rows, 0).items()}


@pytest.mark.parametrize("pre", ["step", "step0"])
def test_training_step_matches_reference(fx, gen_weights, pre: str) -> None:
    torch.set_num_threads(2)
    net = Net_gpp()
    net.load_state_dict(gen_weights, strict=True)
    opt = ktse.build_optimizer(net, lr=0.01, wd=5e-4, max_step=100)
    net.eval()  # fixture convention: dropout off, training requires_grad flags (identical in eval)
    step = ktse.KTSEStep(net, cfg=ktse.KTSEConfig(als_cross=0.0, als_bg=0.0))
    rec: dict = {}
    opt.zero_grad()
    out = step(_t(fx, pre + "_img_a"), _t(fx, pre + "_img_a2"), _t(fx, pre + "_label"), _t(fx, pre + "_label2"),
               int(fx[pre + "_epoch"]), record=rec)
    out["loss"].backward()
    for got, n in zip(rec["main"], ("cam", "out", "gpp", "cam_seg")):
        assert _rel(got.detach().numpy(), fx[f"{pre}_fwd_main_{n}"]) < 1e-4, n
    if pre == "step":
        assert _rel(rec["second"][0].detach().numpy(), fx["step_fwd_second_cam"]) < 1e-4
        assert _rel(rec["masked_input"].numpy(), fx["step_fwd_masked_input"]) < 1e-4
        assert _rel(rec["masked_cam"].detach().numpy(), fx["step_fwd_masked_cam"]) < 1e-4
        assert _rel(rec["mix_input"].numpy(), fx["step_fwd_mix_input"]) < 1e-4
        for got, n in zip(rec["mix"], ("cam", "out", "gpp", "cam_seg")):
            assert _rel(got.detach().numpy(), fx[f"step_fwd_mix_{n}"]) < 1e-4, n
        for k in ("pseudo1", "pseudo2"):
            assert (rec[k].numpy() != fx["step_" + k]).mean() <= 1e-3
        assert _rel([float(v) for v in rec["ce_calls"]], fx["step_ce_calls"]) < 1e-4
        assert _rel([float(v.detach()) for v in rec["seg_ret"]], fx["step_get_seg_loss_ret"]) < 1e-4
        assert _rel(float(rec["seg2_ret"].detach()), fx["step_get_seg_loss2_ret"]) < 1e-4
    # logged values, including the aliased loss_cls (= total) and loss_seg (= full seg loss)
    for n in ktse.LOSS_NAMES[:8]:
        ref = float(fx[f"{pre}_{n}"])
        assert abs(float(out[n]) - ref) <= 1e-4 * max(abs(ref), 1e-3), n
    assert _rel(float(out["loss_bce"]), fx[pre + "_bce_pure"]) < 1e-4
    names = [n for n, p in net.named_parameters() if p.grad is not None]
    assert names == list(fx[pre + "_grad_norm_names"])
    assert [n for n, p in net.named_parameters() if p.requires_grad] == list(fx[pre + "_requires_grad_names"])
    norms = [p.grad.double().norm().item() for n, p in net.named_parameters() if p.grad is not None]
    assert _rel(norms, fx[pre + "_grad_norm"]) < 1e-4
    opt.step()
    for n, p in net.named_parameters():
        if f"{pre}_grad_{n}" in fx.files:
            assert _rel(p.grad.numpy(), fx[f"{pre}_grad_{n}"]) < 1e-4, n
            assert _rel(p.detach().numpy(), fx[f"{pre}_after_{n}"]) < 1e-4, n
    assert _rel([g["lr"] for g in opt.param_groups], fx[pre + "_lr_after"]) < 1e-12
    assert _rel([g["momentum"] for g in opt.param_groups], fx[pre + "_momentum"]) < 1e-12
    assert opt.global_step == int(fx[pre + "_global_step_after"])


def test_optimizer_groups_and_schedule() -> None:
    ref = json.loads(shared_path("reference", "stage1", "optimizer.json").read_text())
    net = Net_gpp(width=0.0625)
    names = {id(p): n for n, p in net.named_parameters()}
    base = ref["groups"][0]  # the 1x group: the base learning rate and weight decay of the run
    opt = ktse.build_optimizer(net, lr=base["initial_lr"], wd=base["weight_decay"], max_step=ref["max_step_default"])
    for g, r in zip(opt.param_groups, ref["groups"]):
        assert [names[id(p)] for p in g["params"]] == r["param_names"]
        for k in ("lr", "initial_lr", "weight_decay", "momentum", "dampening", "nesterov"):
            assert g[k] == pytest.approx(r[k], rel=1e-12), k
    # schedule: lr used by the step with a given 0-based index
    for point in ref["schedule"]["points"]:
        opt.global_step = point["step_index"]
        opt.step()  # no grads: only the schedule moves
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(point["lr"], rel=1e-9)
        assert opt.lr_mult == pytest.approx(point["lr_mult"], rel=1e-9)
    fixed = ktse.build_optimizer(Net_gpp(width=0.0625), 0.01, 5e-4, 10, momentum_fix=True)
    assert all(g["momentum"] == 0.9 for g in fixed.param_groups)


def test_optimizer_state_roundtrip() -> None:
    net = Net_gpp(width=0.0625)
    opt = ktse.build_optimizer(net, 0.01, 5e-4, 50)
    net.train()
    net(torch.randn(1, 3, 16, 16))[1].sum().backward()
    opt.step()
    net2 = Net_gpp(width=0.0625)  # groups are built before .train(), as in train.py
    opt2 = ktse.build_optimizer(net2, 0.01, 5e-4, 1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.global_step == 1 and opt2.max_step == 50
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    assert all(torch.equal(s1[k]["momentum_buffer"], s2[k]["momentum_buffer"]) for k in s1)


# --------------------------------------------------------------------------- KTSE+ ALS units
def test_als_cross_zero_when_activation_stays_in_its_image() -> None:
    h, w = 4, 5
    y1 = torch.zeros(1, 20)
    y2 = torch.zeros(1, 20)
    y1[0, 3] = 1  # class 3 only in the top image
    y2[0, 7] = 1  # class 7 only in the bottom image
    cam = torch.full((1, 20, 2 * h, w), -1.0)
    cam[0, 3, :h] = 2.0
    cam[0, 7, h:] = 2.0
    assert float(ktse.als_cross_loss(cam, y1, y2)) == 0.0
    moved = cam.clone()
    moved[0, 3, h:] = 2.0  # class 3 leaks into the bottom image
    leak = float(ktse.als_cross_loss(moved, y1, y2))
    assert leak == pytest.approx((2.0 - ktse.DELTA) * h * w / (20 * 2 * h * w))
    # a class shared by both images is never penalised
    y2s = y2.clone()
    y2s[0, 3] = 1
    assert float(ktse.als_cross_loss(moved, y1, y2s)) == 0.0


def test_als_bg_zero_when_foreground_avoids_background() -> None:
    cam = torch.full((1, 20, 4, 4), -1.0)
    cam[0, 5, :2] = 3.0  # class 5 active on the top half only
    y = torch.zeros(1, 20)
    y[0, 5] = 1
    pseudo = torch.full((1, 8, 8), 255.0)
    pseudo[0, 6:] = 0  # confident background: bottom rows, far from the activation
    assert float(ktse.als_bg_loss(cam, pseudo, y)) == 0.0
    pseudo_bad = pseudo.clone()
    pseudo_bad[0, :2] = 0  # now background overlaps the activation
    assert float(ktse.als_bg_loss(cam, pseudo_bad, y)) > 0.0


def test_step_with_als_small_width_all_terms_finite() -> None:
    torch.manual_seed(0)
    net = Net_gpp(width=0.0625)
    opt = ktse.build_optimizer(net, 0.01, 5e-4, 10)
    net.train()
    # random weights: the pseudo label may have no background pixel at all -> safe_ce
    step = ktse.KTSEStep(net, cfg=ktse.KTSEConfig(safe_ce=True))
    img = torch.randn(4, 3, 32, 32)
    img2 = torch.randn(4, 3, 32, 32)
    y = torch.zeros(4, 20)
    y2 = torch.zeros(4, 20)
    y[:, 1] = 1
    y2[:, 1] = 1
    y[0, 4] = 1
    y2[1, 9] = 1
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    out = step(img, img2, y, y2, epo=10)
    out["loss"].backward()
    opt.step()
    for n in ktse.LOSS_NAMES:
        assert torch.isfinite(out[n]), n
    assert float(out["loss_als_cross"]) >= 0 and float(out["loss_als_bg"]) >= 0
    changed = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert "fc9.weight" in changed and "b3.conv_branch2a.weight" in changed
    assert "conv1a.weight" not in changed and "b3.bn_branch2a.weight" not in changed


def test_default_objective_is_ktse_plus_als_and_zero_weights_give_plain_ktse() -> None:
    """train.py trains KTSE+ by default: total = released KTSE total + als_cross*L_cross + als_bg*L_bg,
    and --als_cross 0 --als_bg 0 gives the released objective. The defaults are the ones the docs state."""
    import re

    train = cli_module("train.py")

    args = train.build_parser().parse_args(["--name", "x"])
    assert (args.als_cross, args.als_bg) == (1.0, 0.1)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deviations.md").read_text()
    assert "--als_cross 0 --als_bg 0" in doc and re.search(r"defaults 1\.0 and 0\.1", doc)

    def run(cfg: "ktse.KTSEConfig") -> dict:
        torch.manual_seed(0)
        net = Net_gpp(width=0.0625)
        net.train()
        g = torch.Generator().manual_seed(1)
        img, img2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
        y, y2 = torch.zeros(4, 20), torch.zeros(4, 20)
        y[:, 1] = y2[:, 1] = 1
        y[0, 4] = 1
        y2[1, 9] = 1
        with torch.no_grad():
            return ktse.KTSEStep(net, cfg=cfg)(img, img2, y, y2, epo=10)

    plain = run(ktse.KTSEConfig(als_cross=0.0, als_bg=0.0, safe_ce=True))
    plus = run(ktse.KTSEConfig(als_cross=args.als_cross, als_bg=args.als_bg, safe_ce=True))
    assert float(plain["loss_als_cross"]) == 0.0 and float(plain["loss_als_bg"]) == 0.0
    assert float(plus["loss_als_cross"]) > 0.0 or float(plus["loss_als_bg"]) > 0.0
    expected = plain["loss_total"] + 1.0 * plus["loss_als_cross"] + 0.1 * plus["loss_als_bg"]
    assert torch.allclose(plus["loss_total"], expected, rtol=1e-5, atol=1e-6)
