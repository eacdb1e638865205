"""The rules judges measured on the SYNTHETIC world against its hidden truth.

Every answered turn of the bundled synthetic production logs (conf/data) is judged by the
configured panel (default: rules), and compared per category with the behaviours the world's
plan chose for that turn (tasks/synthetic/truth.py, read here and in tests only: judges never
see it). Prints per category tp, fp, fn, tn, sensitivity and specificity, and the turns whose
truth could not be decoded.

    python benchmarks/judge_synthetic.py [--data F] [--judges rules] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.check import check_conversations, load_contract
from tasks.judges import JudgePanel
from tasks.judges.evaluate import views_of
from tasks.load import bundled_path, load_raw
from tasks.synthetic.truth import decode_turn
from tasks.taxonomy import CATEGORIES, load_taxonomy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="synthetic logs (default: the bundled SYNTHETIC logs)")
    ap.add_argument("--judges", default="rules")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    valid = check_conversations(load_raw(a.data or bundled_path()), load_contract(), 1.0, 1.0).valid
    panel = JudgePanel(load_taxonomy(), a.judges.split(","))
    views = [v for row in valid.select("conversation_id", "model", "messages", "tools").to_dicts() for v in views_of(row)]
    import asyncio

    results = asyncio.run(panel.judge_all(views))
    counts: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    unknown = 0
    for view, (combined, _) in zip(views, results, strict=True):
        truth = decode_turn(view.turn)
        if truth is None:
            unknown += 1
            continue
        for c in CATEGORIES:
            v = combined[c].verdict
            if v is None:
                counts[c]["unscored"] += 1
                continue
            if c in truth:
                counts[c]["tp" if v else "fn"] += 1
            else:
                counts[c]["fp" if v else "tn"] += 1
    out = {"turns": len(views), "truth_unknown": unknown, "judges": a.judges, "elapsed_s": round(time.perf_counter() - t0, 1),
           "categories": {}}
    for c, k in counts.items():
        sens = k["tp"] / (k["tp"] + k["fn"]) if k["tp"] + k["fn"] else None
        spec = k["tn"] / (k["tn"] + k["fp"]) if k["tn"] + k["fp"] else None
        out["categories"][c] = {**{x: k[x] for x in ("tp", "fp", "fn", "tn", "unscored")}, "sensitivity": sens, "specificity": spec}
    if a.json:
        print(json.dumps(out))
        return
    print(f"SYNTHETIC world: {out['turns']} turns judged by {a.judges} ({unknown} without decodable truth), {out['elapsed_s']} s")
    print(f"{'category':28s} {'tp':>5s} {'fp':>5s} {'fn':>5s} {'tn':>6s}  sensitivity  specificity")
    for c, r in out["categories"].items():
        fmt = lambda x: "   –  " if x is None else f"{x:6.3f}"  # noqa: E731
        print(f"{c:28s} {r['tp']:5d} {r['fp']:5d} {r['fn']:5d} {r['tn']:6d}  {fmt(r['sensitivity'])}       {fmt(r['specificity'])}")


if __name__ == "__main__":
    main()
