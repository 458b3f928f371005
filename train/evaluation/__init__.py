"""The evaluation of a run, one job per module.

- ``rating_baselines``: global mean, user+item bias, Surprise SVD (rating prediction);
- ``topk_baselines``: most-popular, item-kNN, RP3beta, EASE-R, implicit ALS, same author (top-K lists);
- ``tuning``: the top-K baselines' grids, fitted on training and chosen on validation;
- ``protocols``: who ranks what in the warm, cold-user, cold-book and new-author protocols;
- ``topk``: the top-K tables of the model and the baselines on those protocols;
- ``step``: ``python -m train evaluate``, both tables written to the run folder.
"""
