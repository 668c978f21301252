#!/usr/bin/env bash
# Prepares gpu-data/ for scripts/gpu-train.sh: what the GPU machine cannot read from ../shared
# (only the repository travels there, 64 MiB in all with the CUDA binary). Row subsets of the
# shared datasets, chosen by a fixed hash of the id: general_train (GEN_ROWS, default 40,000 of
# 90,231), general_val (2,000), fashion_train (FM_ROWS, default 20,000 of 60,000). ~30 MB.
# gpu-data/ is ignored by git (.git/info/exclude); carry it: run(..., carry=['target-cuda/dist','gpu-data']).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu-data
grep -qx 'gpu-data/' .git/info/exclude 2>/dev/null || echo 'gpu-data/' >> .git/info/exclude
python3 - "${GEN_ROWS:-40000}" "${FM_ROWS:-20000}" <<'PY'
import hashlib, sys
import pyarrow.parquet as pq, pyarrow as pa
gen_rows, fm_rows = int(sys.argv[1]), int(sys.argv[2])
def subset(src, dst, n, columns=("id", "image")):
    t = pq.read_table(src, columns=list(columns))
    ids = t.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(str(ids[i]).encode()).hexdigest())
    t = t.take(pa.array(sorted(order[:n])))
    pq.write_table(t, dst, compression="zstd", row_group_size=8192)
    print(f"{dst}: {t.num_rows} rows")
d = "../shared/datasets"
subset(f"{d}/general_mix_train.parquet", "gpu-data/general_train.parquet", gen_rows)
subset(f"{d}/general_mix_val.parquet", "gpu-data/general_val.parquet", 2000)
subset(f"{d}/fashion_mnist_train.parquet", "gpu-data/fashion_train.parquet", fm_rows)
PY
du -sh gpu-data
