"""Serving tools that never run in a worker: archive builder, local server, health check, examples."""
