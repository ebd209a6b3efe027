#!/usr/bin/env bash
# The pipeline on the built-in example collection (data/example): mine, inspect, validate.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
MPR="${MPR:-.venv/bin/mpr}"
OUT="${OUT:-runs/demo}"

echo "== mpr mine: retrieve candidates for the 20 training queries and keep hard negatives"
"$MPR" mine --data data/example --split train --out "$OUT/mined" --depth 20 --num-negatives 5 --overwrite
echo
echo "== mpr inspect"
"$MPR" inspect "$OUT/mined"
echo
echo "== mpr validate"
"$MPR" validate "$OUT/mined"
echo
echo "== read the shards with duckdb, no mpr code involved"
.venv/bin/python -c "import duckdb; print(duckdb.sql(\"select source, label, count(*) as rows from '$OUT/mined/*.parquet' group by all order by all\"))"
