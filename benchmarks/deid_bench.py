"""De-identification: share of planted identifiers found, per kind, and false positives.

1. Recall: `--n` (500) planted conversations (tests/test_deid.py `planted_set`: AWS key ids and
   secret keys, GitHub/Slack/Stripe tokens, PEM private keys, passwords in .env lines and in URLs,
   e-mail addresses, phone numbers in international and national formats, IPv4/IPv6, IBANs and
   card numbers), each value in a user message, a tool call's JSON arguments and a tool result.
   A value is found when it appears nowhere in the de-identified record.
2. False positives on the bundled SYNTHETIC logs (conf/data/synthetic-prod-logs.jsonl.gz):
   identifiers found that the synthetic world did not plant (its credentials and e-mail
   addresses are real finds), per kind.
3. False positives on typical code and log text (tests/test_deid.py `CLEAN_TEXTS`: timestamps,
   versions, paths, git hashes, ids, dates).

Run from the repository root:

    python benchmarks/deid_bench.py [--n 500] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.deid import KINDS, Deidentifier  # noqa: E402
from tests.test_deid import (  # noqa: E402
    CLEAN_TEXTS,
    SYNTHETIC_PLANTED,
    found_values,
    leaked,
    planted_set,
)


def recall(n: int, seed: int) -> dict[str, Any]:
    planted: Counter[str] = Counter()
    found: Counter[str] = Counter()
    started = time.perf_counter()
    for record, values in planted_set(n, seed):
        out = Deidentifier().conversation(record)
        for kind, value in values:
            planted[kind] += 1
            found[kind] += not leaked(out, value)
    return {"conversations": n, "seconds": round(time.perf_counter() - started, 2),
            "per_kind": {k: {"planted": planted[k], "found": found[k]} for k in KINDS if planted[k]}}


def synthetic_false_positives() -> dict[str, Any]:
    path = ROOT / "conf" / "data" / "synthetic-prod-logs.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    found: Counter[str] = Counter()
    unexplained: Counter[str] = Counter()
    started = time.perf_counter()
    for record in records:
        for kind, value in found_values(record):
            found[kind] += 1
            pattern = SYNTHETIC_PLANTED.get(kind)
            if pattern is None or not pattern.fullmatch(value):
                unexplained[kind] += 1
    return {"conversations": len(records), "seconds": round(time.perf_counter() - started, 2),
            "per_kind": {k: {"found": found[k], "not_planted": unexplained[k]} for k in KINDS}}


def clean_text_false_positives() -> dict[str, Any]:
    flagged: Counter[str] = Counter()
    for text in CLEAN_TEXTS:
        d = Deidentifier()
        d.learn(text)
        flagged.update({k: v for k, v in d.counts().items() if v})
    return {"texts": len(CLEAN_TEXTS), "per_kind": {k: flagged[k] for k in KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=500, help="planted conversations (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted set (default 0)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    args = parser.parse_args()
    result = {"recall": recall(args.n, args.seed), "synthetic_logs": synthetic_false_positives(),
              "clean_text": clean_text_false_positives()}
    if args.json:
        print(json.dumps(result))
        return
    r = result["recall"]
    print(f"Planted identifiers found ({r['conversations']} conversations, seed {args.seed}, {r['seconds']} s)")
    print(f"  {'kind':<16} {'planted':>8} {'found':>8} {'share':>8}")
    for kind, v in r["per_kind"].items():
        print(f"  {kind:<16} {v['planted']:>8} {v['found']:>8} {100 * v['found'] / v['planted']:>7.1f}%")
    s = result["synthetic_logs"]
    print(f"\nBundled SYNTHETIC logs ({s['conversations']} conversations, {s['seconds']} s): distinct values found per conversation, summed")
    print(f"  {'kind':<16} {'found':>8} {'not planted (false positive)':>30}")
    for kind, v in s["per_kind"].items():
        print(f"  {kind:<16} {v['found']:>8} {v['not_planted']:>30}")
    c = result["clean_text"]
    print(f"\nTypical code and log text ({c['texts']} texts): values flagged (false positives)")
    print("  " + "  ".join(f"{k} {v}" for k, v in c["per_kind"].items()))


if __name__ == "__main__":
    main()
