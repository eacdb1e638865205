"""Benchmark: a 10M-turn Parquet log -> a 2,000-turn stratified sample (issue 3).

    python benchmarks/sample_bench.py                 # 1M and 10M turns, depsim and DuckDB
    python benchmarks/sample_bench.py --json          # one JSON object

Makes the logs once with `depsim synth-logs --turns N` (SYNTHETIC, scale mode) under --data-dir,
then runs, each in a fresh process measured with os.wait4 (wall time, CPU time, peak RSS):

- `depsim sample --data LOG --n 2000` (the real command: lazy scan, allocation, draw, output);
- the same stratified sample computed by DuckDB on the same file (turns from the nested messages
  with list functions, stratum counts, the same allocation, row_number() per stratum ordered by
  a seeded hash), side by side, and the ratio.

It checks that both engines see the same population in every stratum and draw the same number
of turns per stratum (the turns themselves differ: each engine has its own hash function).
Targets: 10M turns in <= 20 s wall and <= 3 GiB peak RSS; 1M -> 10M costs <= 12x the time.
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

STRATA = ["surface", "task_type", "uses_tools"]
GIB = 1024**3

DUCKDB_SCRIPT = r'''
import json, sys
import duckdb
from tasks.sample import _allocate
path, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET enable_progress_bar = false")
con.execute(f"""
CREATE TEMP TABLE turns AS
WITH c AS (
  SELECT conversation_id, surface::VARCHAR AS surface, task_type::VARCHAR AS task_type,
         list_transform(messages, lambda m: m.role::VARCHAR) AS r,
         list_transform(messages, lambda m: m.role::VARCHAR = 'assistant'
                                            AND coalesce(len(m.tool_calls), 0) > 0) AS t
  FROM read_parquet('{path}')
), u AS (
  SELECT *, list_filter(range(1, len(r) + 1), lambda i: r[i] = 'user') AS us FROM c
), x AS (
  SELECT conversation_id, surface, task_type, t, us, len(r) AS nm,
         unnest(us) AS s, generate_subscripts(us, 1) AS k
  FROM u
), y AS (
  SELECT conversation_id, k - 1 AS turn_index, surface, task_type,
         list_bool_or(list_slice(t, s, coalesce(us[k + 1] - 1, nm))) AS uses_tools
  FROM x
)
SELECT *, concat_ws('|', coalesce(surface, '∅'), coalesce(task_type, '∅'), lower(uses_tools::VARCHAR)) AS stratum
FROM y
""")
sizes = dict(con.execute("SELECT stratum, count(*) FROM turns GROUP BY stratum").fetchall())
alloc = _allocate(sizes, n, "proportional")
con.execute("CREATE TEMP TABLE alloc (stratum VARCHAR, take BIGINT, size BIGINT)")
con.executemany("INSERT INTO alloc VALUES (?, ?, ?)", [(h, alloc[h], sizes[h]) for h in sizes])
con.execute(f"""
COPY (
  SELECT t.*, a.size::DOUBLE / a.take AS weight
  FROM turns t JOIN alloc a USING (stratum)
  QUALIFY row_number() OVER (PARTITION BY t.stratum ORDER BY hash(t.conversation_id, t.turn_index, {seed})) <= a.take
) TO '{out}' (FORMAT parquet)
""")
got = dict(con.execute(f"SELECT stratum, count(*) FROM read_parquet('{out}') GROUP BY stratum").fetchall())
print(json.dumps({"population_turns": sum(sizes.values()), "sampled_turns": sum(got.values()),
                  "strata": {h: {"population": sizes[h], "sampled": got.get(h, 0)} for h in sizes}}))
'''


def run_measured(cmd: list[str]) -> tuple[dict[str, Any], str]:
    """Run cmd in a fresh process: wall s, CPU s and peak RSS of exactly that child (os.wait4); stdout."""
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        shown = " ".join(c if len(c) < 80 else "<script>" for c in cmd)
        raise SystemExit(f"{shown} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}, out


def ensure_log(data_dir: Path, turns: int) -> tuple[Path, dict[str, Any] | None]:
    path = data_dir / f"synthetic-{turns // 1_000_000}m-turns.parquet"
    if path.exists():
        return path, None
    data_dir.mkdir(parents=True, exist_ok=True)
    stats, out = run_measured(["depsim", "synth-logs", "--turns", str(turns), "--out", str(path),
                               "--seed", "1", "--json"])
    return path, {**stats, **json.loads(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10_000_000)
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data-dir", default=".bench-data")
    ap.add_argument("--no-duckdb", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    result: dict[str, Any] = {"n": args.n, "strata": STRATA, "cores": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (args.small, args.turns):
            log, made = ensure_log(Path(args.data_dir), size)
            entry: dict[str, Any] = {"log": str(log), "log_bytes": log.stat().st_size}
            if made:
                entry["synth_logs"] = made
            stats, out = run_measured(["depsim", "sample", "--data", str(log), "--n", str(args.n),
                                       "--seed", str(args.seed), "--strata", ",".join(STRATA),
                                       "--out", f"{tmp}/depsim-{size}.parquet", "--json"])
            ours = json.loads(out)
            entry["depsim"] = {**stats, "population_turns": ours["population_turns"],
                               "sampled_turns": ours["sampled_turns"], "weight_sum": ours["weight_sum"]}
            if not args.no_duckdb:
                stats, out = run_measured([sys.executable, "-c", DUCKDB_SCRIPT, str(log), str(args.n),
                                           str(args.seed), f"{tmp}/duckdb-{size}.parquet"])
                theirs = json.loads(out.strip().splitlines()[-1])
                entry["duckdb"] = {**stats, "population_turns": theirs["population_turns"],
                                   "sampled_turns": theirs["sampled_turns"]}
                entry["duckdb_over_depsim_wall"] = round(stats["wall_s"] / entry["depsim"]["wall_s"], 2)
                entry["same_population_per_stratum"] = all(
                    ours["strata"].get(h, {}).get("population") == v["population"] for h, v in theirs["strata"].items()
                ) and len(ours["strata"]) == len(theirs["strata"])
                entry["same_allocation_per_stratum"] = all(
                    ours["strata"].get(h, {}).get("sampled") == v["sampled"] for h, v in theirs["strata"].items())
            result["runs"][str(size)] = entry
    big, small = result["runs"][str(args.turns)], result["runs"][str(args.small)]
    result["scaling_wall"] = round(big["depsim"]["wall_s"] / small["depsim"]["wall_s"], 2)
    result["targets"] = {"wall_le_20s": big["depsim"]["wall_s"] <= 20,
                         "rss_le_3gib": big["depsim"]["peak_rss_gib"] <= 3,
                         "scaling_le_12x": result["scaling_wall"] <= 12}
    if args.json:
        print(json.dumps(result))
        return
    print(f"stratified sample of {args.n} turns, strata {'×'.join(STRATA)}, {os.cpu_count()} cores")
    print(f"{'turns':>12} {'engine':>7} {'wall s':>8} {'cpu s':>7} {'peak GiB':>9} {'population':>11}")
    for size, entry in result["runs"].items():
        for engine in ("depsim", "duckdb"):
            if engine in entry:
                e = entry[engine]
                print(f"{int(size):>12,} {engine:>7} {e['wall_s']:>8} {e['cpu_s']:>7} {e['peak_rss_gib']:>9} "
                      f"{e['population_turns']:>11,}")
        if "duckdb" in entry:
            print(f"{'':>12} duckdb/depsim wall {entry['duckdb_over_depsim_wall']}x; same population per stratum: "
                  f"{entry['same_population_per_stratum']}; same allocation: {entry['same_allocation_per_stratum']}")
    print(f"1M -> 10M: {result['scaling_wall']}x wall; targets: {result['targets']}")


if __name__ == "__main__":
    main()
