"""Reads a glowwatch run's scored and dead-letter Parquet with pyarrow and duckdb (not our code)
and prints what they see as one JSON object, for tests/interop.rs to compare."""
import json
import sys

import duckdb
import pyarrow.dataset as ds

scored, dead = sys.argv[1], sys.argv[2]
out = {}
t = ds.dataset(scored, format="parquet", partitioning="hive").to_table()
scales = sorted(n for n in t.schema.names if n.startswith("lp_scale_"))
out["pyarrow"] = {
    "rows": t.num_rows,
    "columns": t.schema.names,
    "types": {f.name: str(f.type) for f in t.schema},
    "ids": sorted(t.column("id").to_pylist()),
    "log_p_sum": sum(t.column("log_p").to_pylist()),
    "flagged": sum(1 for v in t.column("is_ood").to_pylist() if v),
}
d = ds.dataset(dead, format="parquet").to_table()
out["pyarrow_dead"] = {"rows": d.num_rows, "reasons": sorted(d.column("reason").to_pylist())}

con = duckdb.connect()
q = f"read_parquet('{scored}/**/*.parquet', hive_partitioning = true)"
sum_expr = " + ".join(scales)
rows, flagged, log_p_sum, worst, n_dates = con.execute(
    f"SELECT count(*), count(*) FILTER (WHERE is_ood), sum(log_p), "
    f"max(abs(log_p - ({sum_expr}))), count(DISTINCT date) FROM {q}"
).fetchone()
dead_rows = con.execute(f"SELECT count(*) FROM read_parquet('{dead}/**/*.parquet')").fetchone()[0]
out["duckdb"] = {
    "rows": rows,
    "flagged": flagged,
    "log_p_sum": log_p_sum,
    "max_scale_sum_error": worst,
    "dates": n_dates,
    "dead_rows": dead_rows,
}
json.dump(out, sys.stdout)
