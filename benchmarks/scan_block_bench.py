"""Benchmark: the JSONL(.gz) scan alone (tasks/scan.scan_turns, with the retention of a 2,000-turn
draw) by block size and inflater, each in a fresh process: wall, CPU and peak RSS.

    python benchmarks/scan_block_bench.py                       # the 1M-turn JSONL.gz of run_scale_bench
    python benchmarks/scan_block_bench.py --log big.jsonl.gz --blocks 8,32 --inflate isal,zlib --json

The log is the one benchmarks/run_scale_bench.py writes (`--formats jsonl.gz`) under .bench-data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import tasks.scan as sc
from tasks.config import load_settings
log, block = sys.argv[1], int(sys.argv[2])
sc.BLOCK_BYTES = block << 20
s = load_settings(overrides={"run": {"data": log}, "sample": {"n": 2000, "scan_cache": False}})
keep = sc.Retention.for_settings(s)
t, c = time.perf_counter(), time.process_time()
r = sc.scan_turns(log, keep=keep)
print(json.dumps({"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "turns": r.turns.height, "kept_lines": len(r.kept)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default=".bench-data/synthetic-1m-turns.jsonl.gz")
    ap.add_argument("--blocks", default="4,8,16,32", help="block sizes in MB")
    ap.add_argument("--inflate", default="isal", help="isal,zlib (DEPSIM_INFLATE)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not Path(args.log).is_file():
        raise SystemExit(f"{args.log}: no such log; make it with benchmarks/run_scale_bench.py --formats jsonl.gz "
                         "--turns 1000000 --small 1000000 --no-full")
    root = str(Path(__file__).resolve().parents[1])
    out: dict[str, dict[str, object]] = {}
    for inflate in args.inflate.split(","):
        for block in args.blocks.split(","):
            env = {**os.environ, "DEPSIM_INFLATE": inflate, "PYTHONPATH": root}
            done = subprocess.run([sys.executable, "-c", CHILD, args.log, block], env=env, capture_output=True,
                                  text=True, check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            out[f"{inflate} {block} MB"] = json.loads(done.stdout.strip().splitlines()[-1])
            if not args.json:
                print(f"{inflate:>5} {block:>3} MB: {out[f'{inflate} {block} MB']}", flush=True)
    if args.json:
        print(json.dumps({"log": args.log, "cores": os.cpu_count(), "runs": out}))


if __name__ == "__main__":
    main()
