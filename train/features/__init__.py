"""Text features: the encoder a run uses (distilled from a teacher or as configured), every book and
user text embedded through a cache, and the catalog; the ``distill`` and ``features`` steps."""
