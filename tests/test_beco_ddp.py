"""2-process DDP on CPU (gloo): both ranks end a BECO step with identical weights, equal to one process
stepping on the concatenated batch (fp32 tolerance).

BatchNorm is frozen here (running statistics in train mode too): the reference does not synchronise
BN, so per-rank batch statistics differ from whole-batch ones by design, and SyncBatchNorm has no CPU
kernel. Everything else (gradient averaging across the two DDP-wrapped nets, the loss normalisation
over each rank's pixels, online labels computed through DDP in eval mode) is the production code.
"""
from __future__ import annotations

import os
import socket
import types

import pytest
import torch
import torch.distributed as dist

from segmentation.beco.deeplabv2 import build_deeplabv2
from segmentation.beco.model import BECO, BECOSettings
from segmentation.beco.engine import build_optimizer, train_step, wrap_ddp


def _freeze_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.training = False
            m.train = types.MethodType(lambda self, mode=True: self, m)


def _model() -> BECO:
    torch.manual_seed(0)
    nets = [build_deeplabv2(backbone="resnet18", width=8) for _ in range(2)]
    for n in nets:
        _freeze_bn(n)
    # warm_up 0: the online-label pass (eval forward through DDP) runs too; no random mixing/augmentation
    return BECO(nets[0], nets[1], BECOSettings(mix_prob=0.0, mix_aug=False, warm_up=0))


def _batch():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(4, 3, 40, 40, generator=g)
    label = torch.randint(0, 21, (4, 40, 40), generator=g)
    label[:, :5] = 255
    mask = torch.randint(0, 2, (4, 40, 40), generator=g)
    return img, label, mask


def _step(model: BECO, sl: slice) -> dict[str, torch.Tensor]:
    img, label, mask = _batch()
    opt = build_optimizer(model, 0.01, 0.9, 1e-4)
    train_step(model, opt, img[sl], label[sl], mask[sl])
    sd = model.nets_state_dict()
    return {f"{n}.{k}": v.detach().clone() for n, d in sd.items() for k, v in d.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = wrap_ddp(_model(), torch.device("cpu"))
        sd = _step(model, slice(2 * rank, 2 * rank + 2))
        torch.save(sd, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_single_process(tmp_path):
    # fork: the workers reuse this process's imports (spawn would import torch twice more)
    torch.multiprocessing.start_processes(_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    try:
        init = {f"{n}.{k}": v.detach().clone() for n, d in _model().nets_state_dict().items() for k, v in d.items()}
        single = _step(_model(), slice(0, 4))
        half = _step(_model(), slice(0, 2))
    finally:
        torch.set_num_threads(threads)
    worst, worst_half = 0.0, 0.0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        if not r0[k].is_floating_point():
            continue
        d_ddp, d_one = r0[k] - init[k], single[k] - init[k]
        scale = float(d_one.abs().max())
        if scale == 0:
            assert float(d_ddp.abs().max()) == 0, k
            continue
        worst = max(worst, float((d_ddp - d_one).abs().max()) / scale)
        worst_half = max(worst_half, float((half[k] - init[k] - d_one).abs().max()) / scale)
    assert worst < 1e-4, f"DDP update differs from the concatenated-batch update: rel {worst:.2e}"
    assert worst_half > 1e-2  # the check is sensitive: one rank's half alone gives a different update
