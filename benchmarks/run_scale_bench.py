"""Benchmark: `depsim run` end to end on a 10M-turn Parquet log (issue 13).

    python benchmarks/run_scale_bench.py                        # 10M turns, scan path; 1M, both paths
    python benchmarks/run_scale_bench.py --json
    python benchmarks/run_scale_bench.py --formats jsonl.gz --turns 1000000 --small 1000000 --no-full

Makes the SYNTHETIC logs once (`depsim synth-logs --turns N`, under --data-dir, shared with
benchmarks/sample_bench.py), then runs `depsim run --data LOG --n 2000 --json` in a fresh process
(wall, CPU and peak RSS of that process by os.wait4; the temporary Prefect server is a process of
its own and not counted): the scan -> sample -> fetch -> check path. At --small turns it also runs
the full loader (`DEPSIM_SAMPLE__SCAN=off`: load and contract-check every conversation, then
sample) side by side, the path every run took before. With `jsonl.gz` in --formats the same log
is also written as JSONL.gz (once, gzip level 1) and run the same way: a lazy scan of the JSONL
(ISA-L inflate in a thread, Arrow's JSON reader on two blocks at once, projecting ids, strata and
roles), keeping the lines the draw is likely to pick (a pass more for any picked line it did not
keep). Targets at 10M turns: <= 120 s, <= 2 GiB. With --warm each log
is run a second time with the same run store: the population and the sampled lines come from
the scan cache (tasks/scan_cache.py), as for a run after the next training checkpoint (every
model call is made again: the model-call cache is off for it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_bench import ensure_log

# The second run is a new checkpoint's: every model call made again (the model-call cache off),
# only the scan's population and kept lines from the run store.
WARM = {"DEPSIM_REPLAY__CACHE": "false"}


def run(log: Path, n: int, tmp: str, tag: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One `depsim run` in a fresh process: wall s, CPU s, peak RSS (os.wait4) and what it printed."""
    cmd = ["depsim", "run", "--data", str(log), "--n", str(n), "--store", f"{tmp}/{tag}",
           "--tracking-uri", f"sqlite:///{tmp}/{tag}.db", "--json"]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if code not in (0, 1, 3):  # 1 FAIL and 3 INCONCLUSIVE are finished runs too
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{err[-2000:]}")
    got = json.loads(out)
    contract = got["contract"]
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 1024**3, 2), "exit": code, "verdict": got["verdict"],
            "sampled_turns": got["sampled_turns"], "population_turns": got["population_turns"],
            "checked": contract.get("levels") or {k: contract[k] for k in ("rows_in", "rows_passed", "rows_quarantined")}}


def ensure_jsonl(parquet: Path) -> Path:
    """The same log as JSONL.gz (one line per conversation, as tasks.load reads Parquet rows),
    written once beside it by a child process (gzip level 1)."""
    out = parquet.with_suffix(".jsonl.gz")
    if not out.exists():
        subprocess.run([sys.executable, __file__, "--to-jsonl", str(parquet)], check=True)
    return out


def to_jsonl(parquet: Path) -> None:
    import gzip

    import polars as pl
    import pyarrow.parquet as pq

    from tasks.load import parquet_records

    out = parquet.with_suffix(".jsonl.gz")
    partial = out.with_suffix(".partial")
    pf = pq.ParquetFile(parquet)
    line = 1
    with gzip.open(partial, "wt", encoding="utf-8", compresslevel=1) as fh:
        for g in range(pf.metadata.num_row_groups):
            for start in range(0, pf.metadata.row_group(g).num_rows, 50_000):
                frame = pl.from_arrow(pf.read_row_group(g).slice(start, 50_000))
                assert isinstance(frame, pl.DataFrame)
                rows = parquet_records(str(parquet), frame, range(line, line + frame.height))
                fh.write("\n".join(r["record"] for r in rows) + "\n")
                line += frame.height
    partial.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10_000_000)
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--data-dir", default=".bench-data")
    ap.add_argument("--no-full", action="store_true", help="skip the full loader at --small turns (slow)")
    ap.add_argument("--formats", default="parquet,jsonl.gz", help="log formats to run (the JSONL.gz copy is made once)")
    ap.add_argument("--warm", action="store_true",
                    help="run each log a second time with the same run store: the scan cache's population and kept lines")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--to-jsonl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.to_jsonl:
        to_jsonl(Path(args.to_jsonl))
        return
    formats = args.formats.split(",")
    result: dict[str, Any] = {"n": args.n, "cores": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in dict.fromkeys((args.small, args.turns)):
            log, _ = ensure_log(Path(args.data_dir), size)
            entry: dict[str, Any] = {}
            if "parquet" in formats:
                entry["log_bytes"] = log.stat().st_size
                entry["scan"] = run(log, args.n, tmp, f"scan-{size}")
                if args.warm:
                    entry["scan_warm"] = run(log, args.n, tmp, f"scan-{size}", WARM)
                if size == args.small and not args.no_full:
                    entry["full_loader"] = run(log, args.n, tmp, f"full-{size}", {"DEPSIM_SAMPLE__SCAN": "off"})
            if "jsonl.gz" in formats:
                gz = ensure_jsonl(log)
                entry["jsonl_gz_bytes"] = gz.stat().st_size
                entry["jsonl_gz_scan"] = run(gz, args.n, tmp, f"jsonl-{size}")
                if args.warm:
                    entry["jsonl_gz_warm"] = run(gz, args.n, tmp, f"jsonl-{size}", WARM)
            result["runs"][str(size)] = entry
            if not args.json:
                print(f"{size:>11,} turns: {json.dumps(entry)}", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
