"""Experiment tooling: W&B tracking of a run (``tracking``) and the Optuna sweep (``sweep``)."""
