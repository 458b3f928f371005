"""Data: the Book-Crossing CSVs downloaded or found, ingested and cleaned, split; the generated
sample that stands in for them in the demo and the tests; the ``data`` step."""
