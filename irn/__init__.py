"""Stage two of KTSE+: IRN (inter-pixel relation network) refinement.

CAMs from the stage-one network → confident seed labels (``ir_label``) → IRN boundary /
displacement training → random walk pseudo-labels (``sem_seg``) and confidence masks
(``mask_irn``).  Entry points: ``irn/run_sample.py`` and ``irn/gen_mask.py``.
"""
from pathlib import Path

IRN_DIR = Path(__file__).resolve().parent
REPO_ROOT = IRN_DIR.parent
