#!/usr/bin/env bash
# The demo: a sparse-annotation experiment on a real collection slice shipped with mpr (data/vaswani-demo),
# driven by experiments/demo.toml: mine -> relabel (by a SIMULATED judge answering from the hidden qrels) ->
# train (multi-positive loss on the relabeled data, and single-positive InfoNCE on the mined data) -> eval of
# zero-shot, single-positive and relabeled models on held-out queries with paired tests. Then a look at the shards.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
MPR="${MPR:-.venv/bin/mpr}"
PY="${PY:-.venv/bin/python}"
SECONDS=0

"$MPR" run experiments/demo.toml --set train.overwrite=true
echo
echo "== mpr inspect runs/demo/relabeled"
"$MPR" inspect runs/demo/relabeled
echo
echo "== mpr validate runs/demo/relabeled"
"$MPR" validate runs/demo/relabeled
echo
echo "== the shards read with duckdb, no mpr code involved"
"$PY" -c "import duckdb; print(duckdb.sql(\"select source, prior_label, label, count(*) as rows from 'runs/demo/relabeled/*.parquet' group by all order by all\"))"
echo
echo "== the result (runs/demo/report.md)"
sed -n '/^## Does relabeling help/,$p' runs/demo/report.md
echo "The demo took ${SECONDS}s. The run report: runs/demo/report.md"
