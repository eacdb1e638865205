"""Prefect deployment definitions (prefect.yaml)."""
