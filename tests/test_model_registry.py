"""One way to build a stage-one network from a checkpoint, the --model / --cam_network registry, the loss
terms declared once (a new term reaches the training log without touching train.py) and the hidden
reference-compatibility flags."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import cli_module
import torch

from models import ktse
from models.registry import StageOneNetwork, UnknownModelError, get_model, known_names, model_name
from models.resnet38d import Net_gpp, load_stage_one
from tools.checkpoint import CheckpointKeyError


# ----------------------------------------------------------------------------------------------
# Net_gpp.from_state_dict / load_stage_one
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,D", [(0.0625, 256), (0.125, 32), (0.1, 16), (0.25, 8)])
def test_from_state_dict_infers_width_and_D(width: float, D: int) -> None:
    torch.manual_seed(0)
    src = Net_gpp(width=width, D=D)
    net = Net_gpp.from_state_dict(src.state_dict())
    assert net.D == D and net.C == 20 and not net.training
    # the inferred width builds exactly the checkpoint's shapes (0.1 is not a multiple of 1/4096)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in src.state_dict().items()}
    x = torch.randn(1, 3, 24, 24)
    src.eval()
    assert torch.equal(net(x)[0], src(x)[0])


def test_from_state_dict_module_prefix_and_training_state_files() -> None:
    sd = Net_gpp(width=0.0625).state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    for obj in (ddp, {"model": sd, "optimizer": {}, "epoch": 3}, {"state_dict": ddp}):
        net = Net_gpp.from_state_dict(obj)
        assert net.width == 0.0625
        assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())


def test_from_state_dict_names_wrong_keys_and_width() -> None:
    sd = Net_gpp(width=0.0625).state_dict()
    sd["fc10.weight"] = torch.zeros(1)
    del sd["gconv1.att_p.0.weight"]
    with pytest.raises(CheckpointKeyError) as e:
        Net_gpp.from_state_dict(sd, what="my checkpoint 'x.pth'")
    msg = str(e.value)
    assert "my checkpoint 'x.pth'" in msg and "fc10.weight" in msg and "gconv1.att_p.0.weight" in msg
    with pytest.raises(CheckpointKeyError, match="conv1a.weight"):
        Net_gpp.from_state_dict(Net_gpp(width=0.0625).state_dict(), width=0.25)


def test_load_stage_one_reads_safely_and_names_the_path(tmp_path: Path) -> None:
    from tools.errors import WSSSError

    p = tmp_path / "ck.pth"
    torch.save({"model": Net_gpp(width=0.125, D=16).state_dict()}, p)
    net = load_stage_one(p, model="net.resnet38d")
    assert isinstance(net, Net_gpp) and net.width == 0.125 and net.D == 16
    with pytest.raises(WSSSError) as e:
        load_stage_one(tmp_path / "missing.pth", hint="train one with train.py")
    assert "missing.pth" in str(e.value) and "train one with train.py" in str(e.value)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WSSSError, match="tensor.pth.*expected a Net_gpp state_dict"):
        load_stage_one(tmp_path / "tensor.pth")


def test_irn_make_cam_and_infer_share_the_loader(tmp_path: Path) -> None:
    from irn.steps.make_cam import build_cam_network

    p = tmp_path / "031net_main.pth"
    torch.save({f"module.{k}": v for k, v in Net_gpp(width=0.0625).state_dict().items()}, p)
    assert build_cam_network(str(tmp_path / "031net_main")).width == 0.0625


# ----------------------------------------------------------------------------------------------
# Registry and contract
# ----------------------------------------------------------------------------------------------

def test_registry_alias_and_unknown_name() -> None:
    assert get_model("net.resnet38d") is get_model("ktse")
    assert get_model("ktse").network_class() is Net_gpp
    with pytest.raises(UnknownModelError) as e:
        get_model("aeft_gpp", "--cam_network")
    msg = str(e.value)
    assert "'aeft_gpp'" in msg and "ktse" in msg and "net.resnet38d" in msg and "--cam_network ktse" in msg
    assert known_names() in msg
    conv = model_name()
    assert conv("net.resnet38d") == "net.resnet38d"  # kept as spelled (logs unchanged)
    with pytest.raises(argparse.ArgumentTypeError, match="known: ktse"):
        conv("resnet50")


def test_registered_network_fulfils_the_contract() -> None:
    entry = get_model("ktse")
    net = entry.build_network(D=16, C=20, width=0.0625, train_bn=False, train_stem=False)
    assert isinstance(net, StageOneNetwork)
    cam, out, gpp, cam_seg = net(torch.randn(2, 3, 16, 16))
    assert cam.shape == (2, 20, 2, 2) and out.shape == (2, 20) and gpp.shape == cam.shape
    assert cam_seg.shape == (2, 21, 2, 2) and torch.equal(cam, cam_seg[:, 1:])
    assert len(net.get_parameter_groups()) == 4
    flags = argparse.Namespace(W=[1.0, 0.5, 0.15], TH=[0.4, 0.2], T=3, RCAM_T=[0.35, 0.1], als_cross=0.0,
                               als_bg=0.2, safe_ce=True)
    step = entry.build_step(net, flags)
    assert isinstance(step, ktse.KTSEStep) and step.net is net
    assert step.cfg == ktse.KTSEConfig(cls_weight=1.0, global_align_weight=0.5, erase_threshold=0.4,
                                       ktse_start_epoch=3, pseudo_bg_thresholds=(0.35, 0.1), als_cross=0.0,
                                       als_bg=0.2, safe_ce=True)


def test_reference_flags_map_onto_named_config_fields() -> None:
    train = cli_module("train.py")
    from tools.errors import DataError

    cfg = ktse.KTSEConfig.from_flags(train.build_parser().parse_args(["--name", "x"]))
    assert cfg == ktse.KTSEConfig(safe_ce=False)  # train.py's reference defaults are the config defaults
    with pytest.raises(DataError, match="--W 1.0"):
        ktse.KTSEConfig.from_flags(train.build_parser().parse_args(["--name", "x", "--W", "1"]))


# ----------------------------------------------------------------------------------------------
# Loss terms declared once
# ----------------------------------------------------------------------------------------------

def test_log_line_keeps_the_reference_format() -> None:
    means = {n: float(i) / 3 for i, n in enumerate(ktse.LOSS_NAMES) if n != "loss_total"}
    line = ktse.loss_log_line(means)
    ref, extra = line.split(" | ")
    assert ref.startswith("loss_cls : 0.0, loss_kt : 0.33333, loss_seg : 0.66667")
    assert [kv.split(" : ")[0] for kv in ref.split(", ")] == list(ktse.REFERENCE_LOG)
    assert [kv.split(" : ")[0] for kv in extra.split(", ")] == ["loss_bce", "loss_als_cross", "loss_als_bg"]
    out = {n: torch.tensor(1.5) for n in ktse.LOSS_NAMES} | {"loss": torch.tensor(1.5, requires_grad=True)}
    assert list(ktse.logged_terms(out)) == list(means)


class _StepWithExtraTerm(ktse.KTSEStep):
    """A method variant adding one loss term (its weight would be a config field)."""

    terms = ktse.KTSEStep.terms + (ktse.LossTerm("loss_new_prior", "a new term"),)

    def forward(self, img, img2, label, label2, epo, record=None):
        out = super().forward(img, img2, label, label2, epo, record)
        new = 0.25 * self.net(img)[1].pow(2).mean()
        return {**out, "loss_new_prior": new.detach(), "loss": out["loss"] + new}


def test_new_loss_term_reaches_the_training_log_without_touching_train_py(tmp_path: Path, one_thread) -> None:
    from models.ktse_train import RunningMeans, train_one_epoch

    torch.manual_seed(0)
    net = Net_gpp(width=0.0625, train_bn=True, train_stem=True)
    opt = ktse.build_optimizer(net, 0.01, 5e-4, 10)
    net.train()
    step = _StepWithExtraTerm(net, cfg=ktse.KTSEConfig(safe_ce=True, ktse_start_epoch=0))
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(4, 20)
    y[:, 3] = 1
    batch = {"img_a": torch.randn(4, 3, 16, 16, generator=g), "img_a2": torch.randn(4, 3, 16, 16, generator=g),
             "label": y, "label2": y.clone()}
    lines: list[str] = []

    class _TB:
        def __init__(self) -> None:
            self.tags: list[str] = []

        def scalars(self, values, step, prefix=""):
            self.tags += [prefix + k for k in values]

        def scalar(self, tag, value, step):
            self.tags.append(tag)

    import contextlib

    tb = _TB()
    args = argparse.Namespace(print_freq=1)
    _, epoch_means = train_one_epoch(step, opt, None, contextlib.nullcontext, [batch], 1, 0, 0, RunningMeans(), args,
                                     torch.device("cpu"), lines.append, tb, False)
    assert "loss_new_prior" in epoch_means and "loss_total" not in epoch_means
    line = [ln for ln in lines if "loss_cls :" in ln][0]
    assert line.split(" | ")[1].endswith(f"loss_new_prior : {round(epoch_means['loss_new_prior'], 5)}")
    assert "train/loss_new_prior" in tb.tags


# ----------------------------------------------------------------------------------------------
# Reference-compatibility flags: accepted, hidden
# ----------------------------------------------------------------------------------------------

def test_add_compat_flags_hidden_but_accepted() -> None:
    from tools.cli import add_compat_flags

    p = argparse.ArgumentParser()
    p.add_argument("--real", default=1)
    add_compat_flags(p, {"--lr": dict(type=float, default=0.01), "--crop": dict(type=int, nargs="+", default=[3])})
    assert "--lr" not in p.format_help() and "--crop" not in p.format_help() and "--real" in p.format_help()
    a = p.parse_args(["--lr", "0.5", "--crop", "1", "2"])
    assert a.lr == 0.5 and a.crop == [1, 2] and p.parse_args([]).lr == 0.01
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "x"])  # still typed as the reference


@pytest.mark.parametrize("cli,argv,hidden", [
    ("infer", ["--name", "n", "--load_epo", "1"],
     {"--batch_size": ("4", 4), "--TH": ("0.3", [0.3]), "--MEM": ("2", 2), "--gpu": ("0", 0)}),
    ("train", ["--name", "n"], {"--cj": ("0.1", [0.1]), "--CRF": ("3", 3), "--out_num": ("5", 5),
                                "--num_workers": ("2", 2)}),
    ("run_sample", [], {"--val_list": ("v.txt", "v.txt"), "--cam_batch_size": ("4", 4),
                        "--cam_learning_rate": ("0.2", 0.2), "--irn_network": ("net.x", "net.x")}),
])
def test_cli_compat_flags_hidden_from_help(cli: str, argv: list[str], hidden: dict) -> None:
    if cli == "run_sample":
        mod = cli_module("irn/run_sample.py")
    else:
        mod = __import__(cli)
    p = mod.build_parser()
    text = p.format_help()
    assert [f for f in hidden if f in text.split()] == []
    ns = p.parse_args(argv + [x for f, (v, _) in hidden.items() for x in (f, v)])
    assert {f: getattr(ns, f[2:]) for f in hidden} == {f: want for f, (_, want) in hidden.items()}


def test_unknown_model_is_refused_at_parse_time() -> None:
    train = cli_module("train.py")
    run_sample = cli_module("irn/run_sample.py")

    for parser, argv in ((train.build_parser(), ["--name", "n", "--model", "bogus"]),
                         (run_sample.build_parser(), ["--cam_network", "bogus"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
