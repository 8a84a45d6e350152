"""Confidence masks for BECO (the authors' README command: ``cd irn && python gen_mask.py``).

Reads every ``irn/result/score/<id>.pt`` written by run_sample.py's make_sem_seg_labels step and
writes ``segmentation/data/mask_irn/<id>.png`` (where BECO reads them).  Default paths do
not depend on the working directory; see ``irn.steps.gen_mask`` for the rule.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irn import REPO_ROOT  # noqa: E402
from tools.layout import IRNLayout  # noqa: E402
from tools import cli  # noqa: E402
from tools.dataset import add_dataset_arg  # noqa: E402
from tools.errors import require_all, run_cli  # noqa: E402
from tools.misc import str2bool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="IRN confidence masks (gen_mask.py)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--score_dir", default=str(IRNLayout.reference(REPO_ROOT).score))
    p.add_argument("--mask_out_dir", "--mask_dir", dest="mask_out_dir", default=str(IRNLayout.reference(REPO_ROOT).mask))
    p.add_argument("--thd", type=cli.fraction, default=0.5, help="fraction of each predicted class kept as confident")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False)
    add_dataset_arg(p)
    return p


def run(args: argparse.Namespace) -> None:
    """Check the score folder, then write the masks (``irn.steps.gen_mask.run``)."""
    from irn.steps import gen_mask

    require_all([(args.score_dir, "random-walk score folder (--score_dir)",
                  "run `python run_sample.py` first (its make_sem_seg_labels step writes <id>.pt there)", "dir")])
    gen_mask.run(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
