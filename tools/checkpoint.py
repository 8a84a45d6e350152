"""Checkpoint loading that names what is wrong: missing, unexpected and mis-shaped keys."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from tools.errors import WSSSError, require_file


class CheckpointKeyError(WSSSError, KeyError):
    """A state dict does not fit the module; the message lists the offending keys."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def _short(keys: list[str], n: int = 12) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                            what: str = "checkpoint") -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``module``; on a mismatch raise :class:`CheckpointKeyError` naming keys.

    With ``strict=False`` missing/unexpected keys are returned instead (shape mismatches still raise).
    A leading ``module.`` (DataParallel/DDP) is stripped when every key has it.
    Returns ``(missing, unexpected)``.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {_short(bad_shape)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_short(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
    if problems:
        raise CheckpointKeyError(f"{what} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=False)
    return missing, unexpected


def load_torch_file(path: os.PathLike | str, what: str = "checkpoint", hint: str = "",
                    numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on CPU after checking the file exists.

    Only tensors, containers and plain Python values are rebuilt (no code in the file runs); with
    ``numpy`` also numpy arrays/scalars of numeric dtypes (training states with RNG states, IRN
    score files). Errors name the path and ``hint``; a file asking for any other Python object
    raises :class:`tools.safe_load.UnsafeFileError` naming that object.
    """
    import pickle

    from tools.safe_load import UnsafeFileError, refusal_message, torch_numpy_globals, torch_refused_global

    p = require_file(path, what, hint)
    holds = "tensors, numpy arrays and plain values" if numpy else "tensors and plain values"
    try:
        if numpy:
            with torch.serialization.safe_globals(torch_numpy_globals()):
                return torch.load(p, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or an object weights_only refuses
        refused = torch_refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            raise UnsafeFileError(refusal_message(p, what, refused, holds)) from None
        text = str(e)
        # torch's weights_only message suggests weights_only=False, wrong advice for a file that is not a
        # checkpoint at all: keep only the unpickler's own reason
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load")[0]
        detail = " ".join(f"{type(e).__name__}: {text}".split())[:300]  # one line, even for torch's long messages
        raise WSSSError(f"cannot read {what} '{p}': {detail}. Is the file complete and a torch checkpoint?") from e
