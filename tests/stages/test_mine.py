"""`mpr mine` on a real slice of SciFact with the real encoder."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from pipeline.data.readers import load_beir
from pipeline.data.schema import MINE_SCHEMA
from pipeline.data.shards import read_manifest, read_shards
from pipeline.stages import mine
from pipeline.stages.mine import MineConfig

from ..conftest import SEQ

pytestmark = pytest.mark.slow  # trains or encodes: left out of `make test-fast`


def run_mine(data, out, cache_dir, **kw):
    cfg = MineConfig(data=data, out=out, cache_dir=cache_dir, max_seq_length=SEQ, progress=False, **kw)
    return mine.run(cfg, log=lambda _: None)


@pytest.fixture(scope="module")
def mined(scifact_small, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined") / "out"
    run_mine(scifact_small, out, cache_dir, depth=50, num_negatives=5, queries_per_shard=7)
    return out


def test_ranks_equal_brute_force_search(mined, scifact_small, encoder_path):
    ds = load_beir(scifact_small, "train")
    model = SentenceTransformer(encoder_path, device="cpu")
    model.max_seq_length = SEQ
    passages = [f"{t} {x}" if t else x for t, x in zip(ds.corpus.titles, ds.corpus.texts)]
    c = model.encode(passages, normalize_embeddings=True, batch_size=64)
    table = read_shards(mined).to_pandas()
    qids = list(dict.fromkeys(table.qid))
    q = model.encode([ds.queries[x] for x in qids], normalize_embeddings=True)
    full = q @ c.T  # the brute-force reference: every query against every document
    for row, qid in enumerate(qids):
        order = np.argsort(-full[row], kind="stable")[:50]
        got = table[(table.qid == qid) & table["rank"].notna()].sort_values("rank")
        assert list(got["rank"]) == sorted(got["rank"])
        expected = {ds.corpus.ids[i]: r for r, i in enumerate(order, start=1)}
        # every retrieved row sits at its brute-force rank (ties aside) with the same score
        for pid, rank, score in zip(got.pid, got["rank"], got.score):
            assert abs(score - full[row, ds.corpus.index[pid]]) < 1e-4
            assert abs(full[row, order[int(rank) - 1]] - score) < 1e-4
        assert set(got.pid) <= set(expected)
        assert len(got) == 50  # positives inside the depth keep their rank too


def test_positives_are_never_negatives(mined, scifact_small):
    ds = load_beir(scifact_small, "train")
    table = read_shards(mined).to_pandas()
    for qid, rows in table.groupby("qid"):
        positives = {p for p, s in ds.qrels[qid].items() if s >= 1}
        assert set(rows[rows.label == 1].pid) == positives
        assert not positives & set(rows[rows.source == "mined"].pid)
        negatives = rows[rows.label == 0]
        assert len(negatives) == 5
        # top sampling keeps the best-ranked eligible candidates
        mined_rows = rows[rows.source == "mined"].sort_values("rank")
        assert list(mined_rows[mined_rows.label == 0].pid) == list(mined_rows.pid[:5])


def test_identical_text_positive_is_not_a_negative(scifact_small, cache_dir, tmp_path):
    import shutil

    from ..conftest import read_jsonl, write_beir

    corpus = read_jsonl(scifact_small / "corpus.jsonl")
    rows = [line.split("\t") for line in (scifact_small / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    qid, pid = rows[0][0], rows[0][1]
    original = next(d for d in corpus if d["_id"] == pid)
    corpus.append({"_id": "copy-of-" + pid, "title": "", "text": "  " + original["text"].upper() + " "})
    data = write_beir(
        tmp_path / "dup",
        corpus,
        read_jsonl(scifact_small / "queries.jsonl"),
        {"train": [(q, d, int(s)) for q, d, s in rows]},
    )
    shutil.rmtree(tmp_path / "dup-out", ignore_errors=True)
    run_mine(data, tmp_path / "dup-out", cache_dir, depth=30, num_negatives=5, max_queries=3)
    table = read_shards(tmp_path / "dup-out").to_pandas()
    copy = table[(table.qid == qid) & (table.pid == "copy-of-" + pid)]
    assert len(copy) == 1
    assert copy.iloc[0]["filter"] == "same_text_as_positive"
    assert copy.label.isna().all()


def test_filters_and_random_sampling(scifact_small, cache_dir, tmp_path):
    kw = dict(depth=40, num_negatives=4, skip_top=3, absolute_margin=0.02, max_score=0.6, max_queries=12)
    run_mine(scifact_small, tmp_path / "a", cache_dir, sampling="random", seed=1, **kw)
    run_mine(scifact_small, tmp_path / "b", cache_dir, sampling="random", seed=1, **kw)
    run_mine(scifact_small, tmp_path / "c", cache_dir, sampling="random", seed=2, **kw)
    a, b, c = (read_shards(tmp_path / x).to_pandas() for x in "abc")
    assert a.equals(b)
    assert a[a.label == 0].pid.tolist() != c[c.label == 0].pid.tolist()
    for _, rows in a.groupby("qid"):
        weakest = rows[rows.label == 1].score.min()
        kept = rows[rows.label == 0]
        assert (kept["rank"] > 3).all()
        assert (kept.score <= 0.6 + 1e-6).all()
        assert (kept.score <= weakest - 0.02 + 1e-6).all()
        rejected = rows[(rows.source == "mined") & rows.label.isna()]
        for _, r in rejected.iterrows():
            if r["filter"] == "skip_top":
                assert r["rank"] <= 3
            elif r["filter"] == "absolute_margin":
                assert r.score > weakest - 0.02 - 1e-6
    manifest = read_manifest(tmp_path / "a")
    assert manifest.summary["corpus_encoded"] == 0  # the embedding cache made re-mining free
    assert manifest.summary["corpus_cached"] == 300


def test_relative_margin(scifact_small, cache_dir, tmp_path):
    run_mine(
        scifact_small,
        tmp_path / "r",
        cache_dir,
        depth=30,
        num_negatives=30,
        relative_margin=0.1,
        max_queries=8,
    )
    table = read_shards(tmp_path / "r").to_pandas()
    for _, rows in table.groupby("qid"):
        weakest = rows[rows.label == 1].score.min()
        assert (rows[rows.label == 0].score <= weakest * 0.9 + 1e-6).all()
        assert (rows[rows["filter"] == "relative_margin"].score > weakest * 0.9 - 1e-6).all()


def test_shards_are_complete_and_grouped(mined):
    manifest = read_manifest(mined)
    assert manifest.complete and manifest.planned_shards == len(manifest.shards) == 5  # 30 queries / 7
    assert manifest.inputs and all(i.fingerprint.startswith("sha256:") for i in manifest.inputs)
    assert manifest.config["depth"] == 50 and manifest.mpr_version
    assert sum(s.rows for s in manifest.shards) == read_shards(mined).num_rows
    for shard in manifest.shards:
        table = pq.read_table(mined / shard.name)
        assert table.schema.equals(MINE_SCHEMA)
        qids = table.column("qid").to_pylist()
        # a query's rows are contiguous and positives come first
        assert len(set(qids)) == sum(1 for i, q in enumerate(qids) if i == 0 or qids[i - 1] != q)
        sources = table.column("source").to_pylist()
        for q in set(qids):
            block = [s for s, x in zip(sources, qids) if x == q]
            assert block == sorted(block, key=lambda s: s != "qrels")


def test_bm25_and_union(scifact_small, cache_dir, tmp_path):
    import bm25s

    ds = load_beir(scifact_small, "train")
    run_mine(scifact_small, tmp_path / "bm25", cache_dir, retriever="bm25", depth=20, max_queries=5)
    table = read_shards(tmp_path / "bm25").to_pandas()
    texts = [ds.corpus.full_text(i) for i in range(len(ds.corpus))]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    for qid, rows in table.groupby("qid"):
        scores = retriever.get_scores(
            bm25s.tokenize([ds.queries[qid]], stopwords="en", return_ids=False, show_progress=False)[0]
        )
        ranked = rows[rows["rank"].notna()].sort_values("rank")
        assert np.allclose(
            ranked.score, np.sort(scores)[::-1][: len(ranked)][ranked["rank"].astype(int) - 1], atol=1e-4
        )
    run_mine(scifact_small, tmp_path / "union", cache_dir, retriever="union", depth=20, max_queries=5)
    union = read_shards(tmp_path / "union").to_pandas()
    assert union.groupby("qid").apply(lambda r: r["rank"].notna().sum()).eq(20).all()
