"""Training pipeline: ingest Book-Crossing, split, embed, train, compress, evaluate."""
