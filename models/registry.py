"""Stage-one models by name: the one table behind ``--model`` (train.py, infer.py) and ``--cam_network``
(irn/run_sample.py), and the contract a stage-one network fulfils.

Adding a method or a backbone = one new module (its network class, and its training step if the
losses change) + one :func:`register` line at the bottom of this file. Names are resolved here only;
an unknown name gives one error listing the known ones. Entries name their classes as
``"module:attribute"`` strings, imported on first use, so parsing a command line never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

from tools.errors import WSSSError
from voc12.dataset import VOC12

if TYPE_CHECKING:
    import torch

__all__ = ["StageOneNetwork", "StageOneNetworkClass", "ModelEntry", "UnknownModelError", "register", "get_model",
           "known_names", "model_name"]


# ----------------------------------------------------------------------------------------------
# The backbone contract
# ----------------------------------------------------------------------------------------------

@runtime_checkable
class StageOneNetwork(Protocol):
    """What training (models/ktse.py), CAM inference (models/cam.py) and IRN's make_cam use of a stage-one
    network, besides the ``torch.nn.Module`` methods (``train``/``eval``, ``parameters``, ``state_dict``,
    ``to``). B batch, C classes (the dataset descriptor's), h x w = the feature map of a (H, W) input.

    * ``net(x)`` with x (B,3,H,W) normalised returns ``(cam, out, gpp, cam_seg)``: cam (B,C,h,w) raw class
      maps, out (B,C) image-level logits (the classification loss), gpp (B,C,h,w) the head's auxiliary map,
      cam_seg (B,C+1,h,w) segmentation scores, background first (the pseudo-label losses).
      cam must equal ``cam_seg[:, 1:]``.
    * ``forward_cam(x)``: the same ``cam`` for inference (may skip what ``cam`` does not need).
    * ``get_parameter_groups()``: four lists (weights, biases, scratch weights, scratch biases) for the
      1x / 2x / 10x / 20x learning rates of ``models.ktse.build_optimizer``; call before the first ``.train()``.
    * ``backbone_keys()``: state-dict keys the ImageNet initialisation covers (train.py checks coverage).
    * ``width``, ``D``, ``C``: trunk width multiplier, head width, number of foreground classes.
    """

    width: float
    D: int
    C: int

    def __call__(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        ...

    def forward_cam(self, x: "torch.Tensor") -> "torch.Tensor":
        ...

    def get_parameter_groups(self) -> tuple[list, list, list, list]:
        ...

    def backbone_keys(self) -> list[str]:
        ...


class StageOneNetworkClass(Protocol):
    """The class of a stage-one network: built from flags, or from a checkpoint's state dict."""

    def __call__(self, D: int = 256, C: int = VOC12.num_fg, width: float = 1.0, train_bn: bool = False,
                 train_stem: bool = False) -> StageOneNetwork:
        ...

    def from_state_dict(self, state_dict: Mapping[str, Any], width: float | None = None, D: int | None = None,
                        what: str = "checkpoint") -> StageOneNetwork:
        """Strictly loaded network in eval mode; width/D inferred from the shapes when None."""
        ...


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelEntry:
    """One stage-one method.

    ``network``: ``"module:Class"`` of a :class:`StageOneNetworkClass`.
    ``step``: ``"module:callable"`` ``(network, flags) -> nn.Module`` whose forward runs one training update
    and returns ``{"loss": tensor to backward, <term name>: detached scalar, ...}`` (models/ktse.py).
    ``aliases``: other accepted names (the reference's spellings).
    """

    name: str
    network: str
    step: str
    summary: str
    aliases: tuple[str, ...] = ()

    def network_class(self) -> StageOneNetworkClass:
        return _resolve(self.network)

    def build_network(self, **kwargs: Any) -> StageOneNetwork:
        """A fresh network: kwargs of :class:`StageOneNetworkClass` (D, C, width, train_bn, train_stem)."""
        return self.network_class()(**kwargs)

    def build_step(self, network: Any, flags: Any) -> Any:
        """The training step module around ``network``, configured from the parsed command line ``flags``."""
        return _resolve(self.step)(network, flags)


class UnknownModelError(WSSSError, KeyError):
    """A model name that is not registered; the message lists the known names."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


_ENTRIES: dict[str, ModelEntry] = {}
_NAMES: dict[str, str] = {}  # name or alias -> entry name


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry``; a name or alias already taken raises ``ValueError``."""
    for n in (entry.name, *entry.aliases):
        if n in _NAMES:
            raise ValueError(f"stage-one model name {n!r} is already registered (for {_NAMES[n]!r})")
    _ENTRIES[entry.name] = entry
    for n in (entry.name, *entry.aliases):
        _NAMES[n] = entry.name
    return entry


def known_names() -> str:
    """``'ktse (also net.resnet38d)'``-style listing of every registered name."""
    return ", ".join(e.name + (f" (also {', '.join(e.aliases)})" if e.aliases else "") for e in _ENTRIES.values())


def get_model(name: str, flag: str = "--model") -> ModelEntry:
    """The entry registered under ``name`` or one of its aliases; else :class:`UnknownModelError`
    (``flag`` is the option the name came from, for the message)."""
    key = _NAMES.get(str(name))
    if key is None:
        first = next(iter(_ENTRIES))
        raise UnknownModelError(f"{flag} {name!r} is not a known stage-one model; known: {known_names()}. "
                                f"Pass e.g. {flag} {first}, or register a new model in models/registry.py.")
    return _ENTRIES[key]


def model_name(flag: str = "--model") -> Callable[[str], str]:
    """argparse ``type=``: the name as given when it is registered (so logs keep the spelling), else a
    parse-time error listing the known names."""
    def conv(s: str) -> str:
        try:
            get_model(s, flag)
        except UnknownModelError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return s
    conv.__name__ = "stage-one model"
    return conv


# ----------------------------------------------------------------------------------------------
# Registered models (one line each)
# ----------------------------------------------------------------------------------------------

register(ModelEntry("ktse", "models.resnet38d:Net_gpp", "models.ktse:KTSEStep.from_flags",
                    "KTSE+ on ResNet-38 with the GPP head (Net_gpp)", aliases=("net.resnet38d",)))
