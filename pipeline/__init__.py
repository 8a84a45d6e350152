"""The one-command pipeline (run_pipeline.py): step plans for the toy and VOC presets, the step runner
(skip finished steps, time them, record their figures) and the report (table, plots, example grid)."""
