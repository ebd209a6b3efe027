"""Write data/vaswani-demo, the demo's collection, from a BEIR-layout copy of the Vaswani (NPL) collection.

    python scripts/make_demo_slice.py --src PATH/TO/vaswani --out data/vaswani-demo

Deterministic (no choice depends on any model or result):

- queries: all of the collection's judged queries. Sorted by id, shuffled with `random.Random(SEED)` and dealt
  round-robin into two halves: half 0 is held out (`qrels/test.tsv`, every judged positive), half 1 is for
  training.
- `qrels/train.tsv`: the training queries' full qrels. Only the simulated judge reads them (the hidden truth a
  real LLM judge would have to recover); nothing trains on them.
- `qrels/train-sparse.tsv`: ONE positive per training query, drawn with `random.Random(f"{SEED}:{qid}")` from
  its sorted positive ids, as single-positive annotation would give. This is what mining and training see.
- corpus: every judged document plus `--distractors` documents drawn at random from the unjudged rest,
  in the collection's order; gzipped.

The rules are those of `mpr study`'s folds (mpr/orchestrate/study.py: `fold_assignment`, `kept_positive`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

SEED = 0


def _qid_key(qid: str) -> tuple[int, int, str]:
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        q, p, s = line.split("\t")
        out.setdefault(q, {})[p] = int(s)
    return out


def _tsv(rows: list[tuple[str, str, int]]) -> str:
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("data/vaswani-demo"))
    ap.add_argument("--distractors", type=int, default=765)
    args = ap.parse_args()

    qrels = {
        q: j for q, j in _qrels(args.src / "qrels" / "test.tsv").items() if any(s > 0 for s in j.values())
    }
    order = sorted(qrels, key=_qid_key)
    random.Random(SEED).shuffle(order)
    half = {qid: i % 2 for i, qid in enumerate(order)}
    test, train, sparse = [], [], []
    for qid in sorted(qrels, key=_qid_key):
        rows = [(qid, p, s) for p, s in sorted(qrels[qid].items(), key=lambda kv: _qid_key(kv[0]))]
        if half[qid] == 0:
            test += rows
        else:
            train += rows
            keep = random.Random(f"{SEED}:{qid}").choice(sorted(p for p, s in qrels[qid].items() if s > 0))
            sparse.append((qid, keep, qrels[qid][keep]))

    corpus = _read_jsonl(args.src / "corpus.jsonl")
    judged = {p for j in qrels.values() for p in j}
    rest = [d["_id"] for d in corpus if d["_id"] not in judged]
    chosen = judged | set(random.Random(SEED).sample(rest, min(args.distractors, len(rest))))
    queries = [q for q in _read_jsonl(args.src / "queries.jsonl") if q["_id"] in qrels]

    out = args.out
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(out / "corpus.jsonl.gz", "wb", mtime=0) as f:
        for d in corpus:
            if d["_id"] in chosen:
                f.write(
                    (
                        json.dumps({"_id": d["_id"], "title": d.get("title", ""), "text": d["text"]}) + "\n"
                    ).encode()
                )
    (out / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q["_id"], "text": q["text"]}) + "\n" for q in queries)
    )
    (out / "qrels" / "test.tsv").write_text(_tsv(test))
    (out / "qrels" / "train.tsv").write_text(_tsv(train))
    (out / "qrels" / "train-sparse.tsv").write_text(_tsv(sparse))
    n_train, n_test = len(sparse), len({q for q, _, _ in test})
    print(
        f"{out}: {len(chosen)} documents ({len(judged)} judged), {len(queries)} queries "
        f"(train {n_train}: {len(train)} positives, {len(sparse)} kept; test {n_test}: {len(test)} positives)"
    )


if __name__ == "__main__":
    main()
