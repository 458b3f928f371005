"""The two retrieval towers trained on who read what; the ``retrieval`` step."""
