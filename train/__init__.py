"""The training job, one sub-package per part, each with its step:

- ``data``: download, ingest, split, the generated sample (demo and test data); step ``data``;
- ``features``: text embeddings (cached) and the distilled encoder; steps ``distill`` and ``features``;
- ``rating``: the rating MLP's tensors, fit, encoder fine-tuning and compression; steps ``train``, ``compress``;
- ``retrieval``: the two towers; step ``retrieval``;
- ``ranking``: the item graph and the learned ranker; step ``ranking``;
- ``evaluation``: the rating and top-K tables against tuned baselines; step ``evaluate``;
- ``experiments``: W&B tracking and the Optuna sweep.

``steps`` lists the steps in order; ``run_folder`` writes a run's record; ``metrics`` are the plain
metric functions that fitting and evaluation share.
"""
