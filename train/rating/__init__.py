"""The rating MLP: training tensors with out-of-fold histories, the fit, the optional encoder
fine-tuning, pruning and int8 compression; the ``train`` and ``compress`` steps."""
