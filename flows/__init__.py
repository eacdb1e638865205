"""Prefect flows (simulate) and the depsim CLI."""
