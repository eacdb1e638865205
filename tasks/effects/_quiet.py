"""Imported first by the package: bandit (tasks/effects/pycode.py) enumerates optional formatter
plugins on import, and a missing one (sarif) logs an ERROR line that is not depsim's error, e.g.
in `prefect deploy`, which imports the flows."""

import logging

logging.getLogger("stevedore").setLevel(logging.CRITICAL)
