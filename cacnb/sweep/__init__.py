"""A study over seeds: ``python -m cacnb.sweep`` runs notebook 03 with papermill once per (row, seed) and evaluates
every run on the test split. The command, its files and its exit codes: :mod:`cacnb.sweep.cli`.

The modules: ``plan`` (the runs and their configs, checked up front; the data prepared once), ``runner`` (one run:
papermill, then the test evaluation into ``test.json``), ``cli`` (the sweep loop and the command line).
"""
from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, main, parse_args, run_sweep
from .plan import OWNED_KEYS, Plan, RunSpec, SweepError, build_plan, prepare_data
from .runner import NOTEBOOK, Runner, consistency_columns, finished_row, status_row

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "NOTEBOOK", "OWNED_KEYS", "Plan", "RunSpec", "Runner",
           "SweepError", "build_plan", "consistency_columns", "finished_row", "main", "parse_args", "prepare_data",
           "run_sweep", "status_row"]
