"""The one spelling of an ISBN: ingestion, the served API and the batch job normalise alike."""

from __future__ import annotations


def normalise_isbn(text: str) -> str:
    """Strip whitespace and quotes and upper-case, so '039592720x' joins '039592720X'."""
    return text.strip().strip("\"'").strip().upper()
