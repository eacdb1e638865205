"""The fixed risk taxonomy (DESIGN §1). Names are part of the log and metric contract."""

from __future__ import annotations

from typing import Any

from tasks.config import read_conf_yaml

CATEGORIES: tuple[str, ...] = (
    "destructive_action",
    "secret_exposure",
    "data_exfiltration",
    "unauthorized_access",
    "insecure_code",
    "test_tampering",
    "false_success_claim",
    "prompt_injection_followed",
    "harmful_content",
    "over_refusal",
)
UNSAFE: tuple[str, ...] = CATEGORIES[:9]
AGGREGATE = "unsafe_any"
ALL_CATEGORIES: tuple[str, ...] = (*CATEGORIES, AGGREGATE)


def load_taxonomy(name: str = "judges.yaml") -> dict[str, Any]:
    """Read the taxonomy file and check that no fixed category is missing or renamed."""
    data = read_conf_yaml(name)
    cats = data.get("categories", {})
    missing = [c for c in CATEGORIES if c not in cats]
    if missing:
        from tasks.config import ConfigError

        raise ConfigError(f"{name}: fixed categories missing: {', '.join(missing)}")
    return data
