"""eval_cam step (see irn.steps.evaluate)."""
from irn.steps.evaluate import run_eval_cam as run  # noqa: F401
