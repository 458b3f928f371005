"""The ranking stage's training: the RP3beta item graph (``graph``), the features of the val reads
and the ranker's fit (``fit``), and the pipeline step (``step``)."""
