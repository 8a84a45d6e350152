"""BECO segmentation stage: train two DeepLabV2 networks on IRN pseudo-labels + confidence masks, or test.

The authors' commands (README.md; run from ``segmentation/``)::

    python main.py -dist --logging_tag seg_result --amp                          # train (all GPUs)
    python main.py --test --logging_tag seg_result --ckpt best_ckpt_752.pth      # test, writes logits_msc/

Also ``torchrun --nproc_per_node N main.py -dist ...`` (single or multi node). Settings come from
``configs/beco_deeplabv2_voc.json`` (the values the reference runs); ``--config F`` overlays a
(partial) JSON of the same keys, and every key is a flag of the same name that overrides both.
Outputs go to ``<logging_path_base>/<logging_tag><run_id>/``: ``log.txt``, tensorboard events,
``ckpt_epoch_<E>.pth`` (newest only), ``best_ckpt.pth``, ``best=XX.XX`` marker, ``metrics.json``,
``logits_msc/<id>.npy`` and ``test_metrics.json`` (formats: docs/formats.md). Training into a folder that
already holds a run needs ``--resume`` (continue) or ``--overwrite`` (start again); validation and test
run in fp32 unless ``--amp_eval``.
"""
from __future__ import annotations

import sys
from pathlib import Path

SEG_DIR = Path(__file__).resolve().parent
REPO = SEG_DIR.parent
if str(REPO) not in sys.path:  # the authors' README commands run `python main.py` from segmentation/
    sys.path.insert(0, str(REPO))

from segmentation.beco.engine import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Flags: ``segmentation.beco.config``; the run: ``segmentation.beco.engine``. A user-fixable error is
    one ``error:`` line (exit 2), Ctrl-C one line (exit 130)."""
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
