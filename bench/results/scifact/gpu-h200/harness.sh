# Sourced by run.sh, run2.sh, run3.sh (one GPU lease each): set up, mine SciFact train once, and define
# `run NAME OPTIONS...` (mpr train + mpr eval against zero-shot, a line appended to $OUT/results.jsonl).
# DEADLINE: seconds after the start past which no further recipe starts.
set -u
exec > >(tee -a "$OUT/log") 2>&1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 MPR_CACHE=/tmp/mprcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/d && tar xJf .gpu/scifact.tar.xz -C /tmp/d
python3 - <<'PY' || exit 4
import shutil, os, torch, pyarrow, datasets, sentence_transformers, transformers, pydantic
from safetensors.torch import load_file, save_file
shutil.copytree(".gpu/minilm", "/tmp/minilm", dirs_exist_ok=True)
t = load_file("/tmp/minilm/model16.safetensors"); os.remove("/tmp/minilm/model16.safetensors")
save_file({k: v.float() for k, v in t.items()}, "/tmp/minilm/model.safetensors")
print("versions", torch.__version__, pyarrow.__version__, datasets.__version__, sentence_transformers.__version__, transformers.__version__, torch.cuda.get_device_name(0))
PY
D=/tmp/d/scifact M=/tmp/minilm R=/tmp/runs
el mine
python3 -m mpr mine --data $D --split train --out $R/mined --model $M --depth 100 --num-negatives 15 --batch-size 256 || exit 5
el mined
run() {  # name, then mpr train options
  local name=$1; shift
  if (( $(date +%s) - T0 > DEADLINE )); then el "skip $name (time)"; return; fi
  el "train $name: $*"
  python3 -m mpr train --data $R/mined --out $R/$name --model $M --precision fp32 --memory-budget 60GB "$@" || return
  python3 -m mpr eval --model $R/$name --baseline $M --data $D --split test --batch-size 256 --json $R/$name.eval.json | tail -12
  python3 - "$name" "$*" <<'PY'
import json, os, sys
name, opts = sys.argv[1], sys.argv[2]
ev = json.load(open(f"/tmp/runs/{name}.eval.json")); tr = json.load(open(f"/tmp/runs/{name}/mpr/train.json"))
row = {"name": name, "options": opts, "eval": ev, "train_summary": tr.get("summary"),
       "curve": [e for e in tr.get("log_history", []) if any(k.startswith("eval_") for k in e)]}
open(os.environ["OUT"] + "/results.jsonl", "a").write(json.dumps(row) + "\n")
by = {c["metric"]: c for c in ev["comparison"]}
print("RESULT", name, opts, "ndcg@10", ev["result"]["metrics"]["ndcg@10"], "zs", ev["baseline"]["metrics"]["ndcg@10"], "p", by["ndcg@10"]["p_randomization"])
PY
  el "done $name"
}
