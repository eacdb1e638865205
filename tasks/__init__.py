"""depsim stages as plain typed functions. Prefect wrappers live beside them in tasks/prefect_tasks.py."""
