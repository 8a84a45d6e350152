"""Stand-in pretraining for the toy presets: a ResNet-50 trunk trained as a multi-label classifier on the
training images and their image-level labels (the supervision WSSS already has; no masks), written as a
torchvision-format state dict that IRN's ``--irn_backbone_init`` loads like the ImageNet file.

Why: IRN trains only its edge and displacement heads and keeps the backbone frozen (as the reference
does, on ImageNet features). On a CPU toy run no ImageNet file can be downloaded, and a frozen *random*
trunk gives features that never improve. A minute of classification training on the toy images gives the
heads features that follow the objects. See docs/toy.md for what it changes and what it does not.

CLI::

    python -m models.pretrain --data_root data/toy --train_list data/toy/lists/train_aug.txt \\
        --cls_labels data/toy/lists/cls_labels.npy --width 16 --out data/toy/pretrained/resnet50_w16.pth

The output is written once (atomically) and reused like a downloaded file; ``--overwrite`` retrains.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from irn.net.resnet50 import FixedBatchNorm, ResNet
from tools import cli
from tools.dataset import add_dataset_arg, get_dataset
from tools.errors import run_cli
from tools.imutils import IMAGENET_MEAN, IMAGENET_STD
from tools.io import atomic_torch_save
from voc12.lists import labels_for, load_cls_labels, load_image, read_id_list

#: the ImageNet mean/std in 0-255 units (float32, the precision the crops are computed in)
MEAN = np.array(IMAGENET_MEAN, np.float32) * 255
STD = np.array(IMAGENET_STD, np.float32) * 255


def normalised(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 ``(v - 255·mean) / (255·std)``, once per image."""
    return torch.from_numpy(((img.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())


def trainable_resnet50(width: int) -> ResNet:
    """IRN's ResNet-50 trunk (torchvision key names) with ordinary, trainable BatchNorm in place of the
    frozen one, so that the state dict it trains loads into IRN unchanged."""
    net = ResNet(base_width=width)
    for name, m in list(net.named_modules()):
        if isinstance(m, FixedBatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, nn.BatchNorm2d(m.num_features))
    return net


class Classifier(nn.Module):
    """``trunk`` + global average pooling + a linear layer named ``fc`` (torchvision's name, which the
    IRN loader drops): (B, 3, H, W) -> (B, C) logits."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trainable_resnet50(width)
        self.fc = nn.Linear(self.trunk.channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's tensors and ``fc.*`` under torchvision's ResNet key names."""
        sd = {k: v.detach().clone() for k, v in self.trunk.state_dict().items()}
        sd.update({f"fc.{k}": v.detach().clone() for k, v in self.fc.state_dict().items()})
        return sd


def random_crop(img: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) float32 (:func:`normalised`) -> (3, crop, crop): rescaled so the long side is about
    ``crop`` (x0.9-1.4), flipped half the time, randomly cropped or zero-padded to ``crop``."""
    h, w = img.shape[1:]
    s = rng.uniform(0.9, 1.4) * crop / max(h, w)
    t = F.interpolate(img[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)[0]
    if rng.random() < 0.5:
        t = t.flip(-1)
    hh, ww = t.shape[1:]
    y0, x0 = int(rng.integers(0, max(hh - crop, 0) + 1)), int(rng.integers(0, max(ww - crop, 0) + 1))
    t = t[:, y0:y0 + crop, x0:x0 + crop]
    out = torch.zeros(3, crop, crop)
    oy, ox = int(rng.integers(0, crop - t.shape[1] + 1)), int(rng.integers(0, crop - t.shape[2] + 1))
    out[:, oy:oy + t.shape[1], ox:ox + t.shape[2]] = t
    return out


def pretrain(images: list[np.ndarray], labels: np.ndarray, width: int = 16, epochs: int = 40, batch_size: int = 16,
             crop: int = 96, lr: float = 0.05, seed: int = 0, quiet: bool = True) -> tuple[Classifier, list[dict]]:
    """Train :class:`Classifier` with binary cross-entropy on ``images`` ((H, W, 3) uint8 each) and
    ``labels`` ((N, C) multi-hot). SGD (momentum 0.9, weight decay 1e-4) with a warm-up + cosine
    schedule peaking at ``lr``. Returns the model and one ``{"epoch", "loss", "exact"}`` dict per epoch (``exact``: share
    of training crops whose every label is predicted right). Deterministic for a given seed on one thread
    count."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y_all = torch.from_numpy(np.asarray(labels, np.float32))
    model = Classifier(width, y_all.shape[1])
    inputs = [normalised(im) for im in images]
    per_epoch = max(1, len(images) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    total = epochs * per_epoch
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over a tenth of the steps, then cosine to 0
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm))))
    history = []
    model.train()
    for ep in tqdm(range(epochs), desc="pretrain", disable=quiet):
        perm = rng.permutation(len(images))
        loss_sum = exact = 0.0
        for b in range(per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = torch.stack([random_crop(inputs[i], crop, rng) for i in idx])
            y = y_all[idx]
            logit = model(x)
            loss = F.binary_cross_entropy_with_logits(logit, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            exact += float(((logit > 0) == (y > 0.5)).all(1).float().mean())
        history.append({"epoch": ep, "loss": loss_sum / per_epoch, "exact": exact / per_epoch})
    return model, history


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_arg(ap)
    ap.add_argument("--data_root", required=True, help="dataset folder (the toy set, e.g. data/toy)")
    ap.add_argument("--train_list", required=True, help="training image list")
    ap.add_argument("--cls_labels", required=True, help="image-level labels (cls_labels.npy)")
    ap.add_argument("--out", required=True, help="where the torchvision-format ResNet-50 state dict goes")
    ap.add_argument("--width", type=cli.positive_int, default=16, help="ResNet-50 base width (IRN's --irn_backbone_width)")
    ap.add_argument("--epochs", type=cli.positive_int, default=40)
    ap.add_argument("--batch_size", type=cli.positive_int, default=16)
    ap.add_argument("--crop", type=cli.int_at_least(32), default=96)
    ap.add_argument("--lr", type=cli.positive_float, default=0.05)
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="retrain even if --out exists")
    return ap


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    if out.is_file() and not a.overwrite:
        print(f"pretrain: {out} exists, reusing it (--overwrite to retrain)")
        return
    ds = get_dataset(a.dataset)
    ids = read_id_list(a.train_list)
    labels = labels_for(ids, load_cls_labels(a.cls_labels, ds), a.cls_labels, ds)
    images = [load_image(a.data_root, i, ds) for i in ids]
    print(f"pretrain: ResNet-50 width {a.width}, multi-label classification of {len(ids)} images "
          f"({ds.num_fg} classes, image-level labels only), {a.epochs} epochs -> {out}")
    model, hist = pretrain(images, labels, a.width, a.epochs, a.batch_size, a.crop, a.lr, a.seed, quiet=False)
    last = hist[-1]
    print(f"pretrain: last epoch loss {last['loss']:.4f}, all labels right on {100 * last['exact']:.0f}% of crops")
    atomic_torch_save(model.torchvision_state_dict(), out)
    print(f"pretrain: saved {out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
