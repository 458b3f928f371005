"""Value ranges of the Book-Crossing data, defined once.

Ingestion cleans the data to these ranges, the network clips its ratings to them, the baselines
clip theirs, and the serving request model accepts only values inside them, so a request stays
in the distribution the model was trained on.
"""

from __future__ import annotations

# Explicit ratings; the dump's 0 means "interacted, no rating" (an implicit rating).
RATING_MIN = 1.0
RATING_MAX = 10.0
IMPLICIT_RATING = 0

# Ages outside this range are data-entry noise in the dump and become unknown.
AGE_MIN = 5
AGE_MAX = 100

# Publication years; the dump writes 0 for unknown and has typos far in the future.
YEAR_MIN = 1000
YEAR_MAX = 2030
