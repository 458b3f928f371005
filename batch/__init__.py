"""Batch scoring of users x books with Apache Beam into Parquet (``python -m batch``, docs/BATCH.md)."""
