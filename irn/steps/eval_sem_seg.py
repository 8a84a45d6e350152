"""eval_sem_seg step (see irn.steps.evaluate)."""
from irn.steps.evaluate import run_eval_sem_seg as run  # noqa: F401
