#!/usr/bin/env bash
# The whole pipeline on the built-in example collection (data/example): mine -> relabel -> synth ->
# train -> eval, driven by experiments/example.toml, then a look at the shards.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
MPR="${MPR:-.venv/bin/mpr}"

"$MPR" run experiments/example.toml --set train.overwrite=true
echo
echo "== mpr inspect runs/demo/relabeled"
"$MPR" inspect runs/demo/relabeled
echo
echo "== mpr validate runs/demo/relabeled"
"$MPR" validate runs/demo/relabeled
echo
echo "== the shards read with duckdb, no mpr code involved"
.venv/bin/python -c "import duckdb; print(duckdb.sql(\"select source, prior_label, label, count(*) as rows from 'runs/demo/relabeled/*.parquet' group by all order by all\"))"
echo "The run report: runs/demo/report.md"
