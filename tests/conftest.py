"""Shared test fixtures: paths to the parity fixtures and optional real data, a tiny generated toy VOC tree."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Parity fixtures ship with the repository (tests/fixtures/reference); real data (VOC samples, MXNet
# .params files) is only read from a shared/ folder beside the clone and its tests skip where it is absent.
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
REALDATA = SHARED / "realdata"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are small; more threads only thrash the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


#: The command-line scripts, relative to the repository root. Tests reach them only through
#: :func:`cli_module` / :func:`cli_main` (or as a subprocess), never by ``import``; the library they call
#: is imported directly (tests/test_repo_rules.py enforces both).
CLI_SCRIPTS = ("train.py", "infer.py", "evaluation.py", "run_pipeline.py", "irn/run_sample.py",
               "irn/gen_mask.py", "segmentation/main.py", "segmentation/test.py",
               # library modules too (toy.generate, prepare.prepare): only their main() is the CLI
               "voc12/toy.py", "voc12/prepare.py", "coco14/toy.py", "coco14/prepare.py")


def cli_module(script: str) -> ModuleType:
    """The CLI ``script`` (a path relative to the repository root, one of ``CLI_SCRIPTS``) loaded from
    its file under a private module name (``_cli_<path>``), once per session, so a test can build its
    parser or patch what it calls without the script ever becoming an importable module."""
    if script not in CLI_SCRIPTS:
        raise ValueError(f"{script!r} is not one of the CLI scripts {CLI_SCRIPTS}")
    name = "_cli_" + script[:-3].replace("/", "_")
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return mod


def cli_main(script: str, argv: list[str]) -> int:
    """Run the CLI ``script`` in this process the way its command line does: ``main(argv)``; returns
    its exit status."""
    return cli_module(script).main(list(argv))


def shared_path(*parts: str) -> Path:
    """A path under the optional shared/ folder beside the clone, or for ``("reference", ...)`` under the shipped tests/fixtures/reference;
    skips the test when it is absent."""
    p = REFERENCE.joinpath(*parts[1:]) if parts and parts[0] == "reference" else SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared material not found: {p}")
    return p


@pytest.fixture(scope="session")
def toy_voc(tmp_path_factory) -> Path:
    """A small deterministic toy VOC tree (12 train + 6 val images, <= 96 px), with prepared lists.

    Returns the VOC root; lists and cls_labels.npy are in ``<root>/lists``.
    """
    from voc12 import toy, prepare

    root = tmp_path_factory.mktemp("toy") / "VOC2012"
    toy.generate(root, n_train=12, n_val=6, max_size=96, seed=0)
    prepare.prepare(root, out_dir=root / "lists")
    return root


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one torch thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
