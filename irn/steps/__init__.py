"""IRN pipeline steps; each module has ``run(args)`` taking the run_sample.py namespace."""
