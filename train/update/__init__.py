"""Catalog updates: a new model version from a served one and new books, users, ratings and
withdrawn ISBNs, without retraining (``python -m train update``)."""
