"""The shared training runtime (tools.runtime, tools.train_state): device choice, AMP context per device,
poly LR with/without the momentum quirk (equal to the three schedules the trainers had before), the
training state round trip with RNG states, keep-last-N."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.errors import DataError
from tools.runtime import (PolySchedule, Runtime, amp_dtype, amp_setup, autocast, poly_sgd, select_device,
                           setup_runtime, sgd_momentum)
from tools.train_state import (keep_last, load_training_state, numbered_files, reseed_epoch, rng_state,
                               save_training_state, set_rng_state)


# ---------------------------------------------------------------------------------------------- device
def test_select_device_and_single_process_runtime(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cpu", local_rank=3) == torch.device("cpu")  # the rank picks a GPU only
    import argparse

    args = argparse.Namespace(device="cpu")
    rt = setup_runtime(args)
    assert rt == Runtime(torch.device("cpu"), 0, 1, False) and rt.is_main
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)


def test_select_device_refuses_missing_cuda(monkeypatch):
    from tools.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        select_device("cuda", local_rank=0)


# ---------------------------------------------------------------------------------------------- AMP
def test_amp_choice_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu) == torch.bfloat16 and amp_dtype(cuda) == torch.float16
    assert amp_dtype(cpu, "fp16") == torch.float16 and amp_dtype(cuda, "bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        amp_dtype(cpu, "fp8")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(cpu, True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, False):
        assert (a @ b).dtype == torch.float32
    factory, scaler = amp_setup(cpu, True)
    assert scaler is None  # bf16 needs no loss scaling
    with factory():
        assert (a @ b).dtype == torch.bfloat16
    factory, scaler = amp_setup(cpu, False)
    assert scaler is None
    with factory():
        assert (a @ b).dtype == torch.float32
    assert amp_setup(cpu, True, "fp16")[1] is None  # GradScaler only on CUDA


# ---------------------------------------------------------------------------------------------- poly LR
def _legacy_stage_one(initial: list[float], step: int, max_step: int, power: float, current: list[float]):
    # the previous PolyOptimizer.step: lr = initial_lr * (1 - step/max_step) ** power, only before max_step
    if step < max_step:
        mult = (1 - step / max_step) ** power
        return [i * mult for i in initial]
    return current


def _legacy_irn(base: list[float], step: int, max_step: int, current: list[float]):
    # the previous inline loop of train_irn: poly_lr(lr0, step, max_step, 0.9) while step < max_step
    from tools.misc import poly_lr

    return [poly_lr(b, step, max_step, 0.9) for b in base] if step < max_step else current


def _legacy_beco(lr: float, it: int, max_iters: int, power: float, min_lr: float, n_groups: int):
    # the previous set_lr closure of BECO: max(lr * (1 - it/max_iters) ** power, min_lr)
    frac = min(max(it / float(max_iters), 0.0), 1.0)
    return [max(lr * (1.0 - frac) ** power, min_lr)] * n_groups


def _params(n: int = 4) -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01 * m, "weight_decay": wd}
            for m, wd in zip((1, 2, 10, 20)[:n], (5e-4, 0, 5e-4, 0)[:n])]


def test_poly_schedule_equals_the_three_previous_schedules():
    from models.ktse import PolyOptimizer

    max_step = 37
    opt = PolyOptimizer(_params(), lr=0.01, weight_decay=5e-4, max_step=max_step)
    current = [g["lr"] for g in opt.param_groups]
    for step in range(max_step + 5):  # past max_step too: the rates stay
        expect = _legacy_stage_one([0.01, 0.02, 0.1, 0.2], step, max_step, 0.9, current)
        opt.step()
        current = [g["lr"] for g in opt.param_groups]
        assert current == expect, step  # bit-identical, not approximately

    irn = poly_sgd(_params(2), lr=0.1, weight_decay=1e-4, momentum=0.9, momentum_quirk=True)
    sched = PolySchedule.for_optimizer(irn, max_step)
    current = [g["lr"] for g in irn.param_groups]
    base = list(current)
    for step in range(max_step + 3):
        expect = _legacy_irn(base, step, max_step, current)
        sched.apply(irn, step)
        current = [g["lr"] for g in irn.param_groups]
        assert current == expect, step

    beco = poly_sgd(_params(2), lr=0.01, weight_decay=1e-4, momentum=0.9)
    sched = PolySchedule([0.01, 0.01], 50, power=0.9, min_lr=5e-4)
    for it in range(50):
        sched.apply(beco, it)
        assert [g["lr"] for g in beco.param_groups] == _legacy_beco(0.01, it, 50, 0.9, 5e-4, 2), it
    assert sched.lrs(49)[0] == 5e-4  # the min_lr clamp bites near the end


def test_momentum_quirk_is_an_explicit_argument():
    from models.ktse import PolyOptimizer
    from segmentation.beco.engine import build_optimizer as beco_optimizer

    assert sgd_momentum(0.9, 5e-4, momentum_quirk=True) == 5e-4
    assert sgd_momentum(0.9, 5e-4, momentum_quirk=False) == 0.9
    assert all(g["momentum"] == 5e-4 for g in PolyOptimizer(_params(), 0.01, 5e-4, 10).param_groups)
    assert all(g["momentum"] == 0.9 for g in PolyOptimizer(_params(), 0.01, 5e-4, 10, momentum_fix=True).param_groups)
    quirk = poly_sgd(_params(2), lr=0.1, weight_decay=1e-4, momentum_quirk=True)
    assert all(g["momentum"] == 1e-4 for g in quirk.param_groups)

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network1, self.network2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    beco = beco_optimizer(Two(), 0.01, 0.9, 1e-4)  # BECO's reference uses real momentum
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in beco.param_groups)


# ---------------------------------------------------------------------------------------------- state
def _toy():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = poly_sgd(net.parameters(), lr=0.1, weight_decay=1e-4, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return net, opt


def _draw(gen: torch.Generator) -> tuple:
    return (random.random(), float(np.random.rand()), float(torch.rand(1)), torch.randperm(10, generator=gen).tolist())


def test_training_state_round_trip_with_rng(tmp_path):
    net, opt = _toy()
    gen = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "state" / "last.pth"
    path.parent.mkdir()
    save_training_state(path, {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 4, "step": 9},
                        generators={"loader": gen})
    expect = _draw(gen)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    gen2 = torch.Generator().manual_seed(0)
    st = load_training_state(path, "training state", "start over", required=("model", "optimizer", "rng"))
    set_rng_state(st["rng"], {"loader": gen2})
    assert _draw(gen2) == expect
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(st["model"])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    opt2 = poly_sgd(net2.parameters(), lr=0.1, weight_decay=1e-4)
    opt2.load_state_dict(st["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert (st["epoch"], st["step"]) == (4, 9)
    assert not list(path.parent.glob("*.tmp*"))  # written atomically: no temp file left


def test_state_without_generators_restores_the_rest(tmp_path):
    save_training_state(tmp_path / "s.pth", {"epoch": 0})
    st = load_training_state(tmp_path / "s.pth", "state", "hint")
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    set_rng_state(st["rng"], {"loader": gen})  # an older state without the loader generator
    assert torch.equal(gen.get_state(), before)
    assert set(rng_state()) >= {"python", "numpy", "torch"}


def test_load_training_state_names_missing_entries(tmp_path):
    torch.save({"model": {}}, tmp_path / "last.pth")
    with pytest.raises(DataError, match=r"last\.pth' lacks the epoch/optimizer entries; it was not written by x"):
        load_training_state(tmp_path / "last.pth", "state", "pass --overwrite", required=("model", "optimizer", "epoch"),
                            written_by="x")


def test_loader_order_resumes_exactly():
    """A DataLoader's shuffling generator saved after epoch 1 gives epoch 2 the uninterrupted order."""
    ds = list(range(12))
    gen = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=gen)
    [b.tolist() for b in loader]  # epoch 1
    saved = rng_state({"loader": gen})
    epoch2 = [b.tolist() for b in loader]
    gen2 = torch.Generator().manual_seed(3)
    fresh = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=gen2)
    set_rng_state(saved, {"loader": gen2})
    assert [b.tolist() for b in fresh] == epoch2


def test_reseed_epoch_is_per_epoch_and_rank():
    s = reseed_epoch(5, 2, 0)
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert reseed_epoch(5, 2, 0) == s and (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert len({reseed_epoch(5, 2, 1), reseed_epoch(5, 3, 0), s}) == 3


def _touch(folder: Path, names: list[str]) -> None:
    for n in names:
        (folder / n).write_bytes(b"x")


def test_keep_last_n(tmp_path):
    _touch(tmp_path, [f"{e:03d}net_main.pth" for e in range(6)] + ["last.pth", "007net_main.pth.tmp"])
    files = numbered_files(tmp_path, r"(\d+)net_main\.pth")
    assert [k for k, _ in files] == [0, 1, 2, 3, 4, 5]
    assert keep_last(files, 5, 0) == []  # 0 keeps everything (the reference)
    gone = keep_last(files, 5, 2)
    assert sorted(p.name for p in gone) == [f"{e:03d}net_main.pth" for e in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["004net_main.pth", "005net_main.pth",
                                                          "007net_main.pth.tmp", "last.pth"]
    # newest-only (BECO's ckpt_epoch) also drops a newer file left by a superseded run
    _touch(tmp_path, ["ckpt_epoch_3.pth", "ckpt_epoch_9.pth", "ckpt_epoch_4.pth"])
    keep_last(numbered_files(tmp_path, r"ckpt_epoch_(\d+)\.pth"), 4, 1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_epoch_*")) == ["ckpt_epoch_4.pth"]


# ---------------------------------------------------------------------------------------------- speed flags
SPEED_FLAGS = ("channels_last", "compile", "persistent_workers")


def _stage1_parser():
    from conftest import cli_module

    return cli_module("train.py").build_parser()


def test_speed_flags_parse_and_default_off():
    from segmentation.beco.config import parse_args

    p = _stage1_parser()
    off = p.parse_args(["--name", "x"])
    assert not any(getattr(off, f) for f in SPEED_FLAGS + ("cudnn_benchmark",)) and off.amp_dtype == "auto"
    on = p.parse_args(["--name", "x", "--channels_last", "--compile", "--persistent_workers",
                       "--cudnn_benchmark", "--amp_dtype", "bf16"])
    assert all(getattr(on, f) for f in SPEED_FLAGS + ("cudnn_benchmark",)) and on.amp_dtype == "bf16"
    beco_off = parse_args([])
    assert not any(getattr(beco_off, f) for f in SPEED_FLAGS) and beco_off.amp_dtype == "auto"
    beco_on = parse_args(["--channels_last", "--compile", "--persistent_workers"])
    assert all(getattr(beco_on, f) for f in SPEED_FLAGS)


@pytest.fixture
def restore_backends():
    old = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = old


def test_set_backends_from_flags(restore_backends):
    from tools.runtime import set_backends

    torch.backends.cudnn.benchmark = False
    set_backends(torch.device("cpu"), benchmark=True, deterministic=True, tf32=True)  # CPU: untouched
    assert torch.backends.cudnn.benchmark is False
    cuda = torch.device("cuda")  # only the device type is read; no GPU needed
    set_backends(cuda, benchmark=True)
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
    set_backends(cuda, benchmark=False, deterministic=True, tf32=False)
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False


def test_loader_kwargs_pin_on_cuda_persistent_only_with_workers():
    from tools.runtime import loader_kwargs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_kwargs(cpu, 4) == {"num_workers": 4, "pin_memory": False, "persistent_workers": False}
    assert loader_kwargs(cuda, 4)["pin_memory"] is True
    assert loader_kwargs(cuda, 4, persistent=True)["persistent_workers"] is True
    assert loader_kwargs(cuda, 0, persistent=True)["persistent_workers"] is False  # DataLoader refuses it


def test_channels_last_only_on_cuda_and_values_kept():
    from tools.runtime import channels_last_on, prepare_module, to_device

    cpu = torch.device("cpu")
    assert channels_last_on(torch.device("cuda"), True) and not channels_last_on(cpu, True)
    assert not channels_last_on(torch.device("cuda"), False)
    x = torch.randn(2, 3, 5, 7)
    y = to_device(x, cpu, channels_last=True)
    assert torch.equal(x, y) and y.is_contiguous()  # CPU: standard layout stays
    conv = torch.nn.Conv2d(3, 4, 3)
    prepare_module(conv, cpu, channels_last=True)
    assert conv.weight.is_contiguous()


def _record_compile(monkeypatch) -> list:
    calls: list = []

    def fake_compile(fn, *a, **k):  # identity: the tests never compile for real
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_prepare_module_compiles_in_place_and_keeps_keys(monkeypatch):
    from tools.runtime import prepare_module

    calls = _record_compile(monkeypatch)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    keys = list(net.state_dict())
    assert prepare_module(net, torch.device("cpu")) is net and calls == []
    assert prepare_module(net, torch.device("cpu"), compile=True) is net and len(calls) == 1
    assert list(net.state_dict()) == keys
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(net(x), net[1](net[0](x)))


class _Stop(Exception):
    pass


def test_stage_one_and_beco_call_compile_with_the_flag(toy_voc, tmp_path, monkeypatch, one_thread):
    """Both trainers hand their training networks to torch.compile with --compile (stopped right after)."""
    from conftest import cli_module

    import segmentation.beco.engine as engine
    import tools.logging_utils as lu
    from segmentation.beco.config import parse_args
    from test_segmentation_cli import _flags
    from test_train import _args

    calls = _record_compile(monkeypatch)

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(lu, "TBWriter", stop)  # stage one builds it right after preparing the model
    with pytest.raises(_Stop):
        cli_module("train.py").train(_stage1_parser().parse_args(_args(toy_voc, tmp_path, "s1", "--compile")))
    assert len(calls) == 1
    monkeypatch.setattr(engine, "read_id_list", stop)  # BECO reads its list right after
    with pytest.raises(_Stop):
        engine.run(parse_args(_flags(toy_voc, tmp_path, "beco") + ["--compile"]))
    assert len(calls) == 3  # network1 and network2
