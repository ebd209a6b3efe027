"""Evaluation: ir_measures metrics against hand arithmetic, paired tests, and the `mpr eval` stage end to
end on SciFact."""

from __future__ import annotations

import math
from pathlib import Path

import ir_measures
import pytest
from scipy import stats

from pipeline.errors import MprError
from pipeline.retrieval.ir_evaluator import IREvaluator
from pipeline.retrieval.metrics import compute_metrics, paired_tests, relevant_queries
from pipeline.stages import evaluate
from pipeline.stages.evaluate import EvalConfig, EvalReport, format_table

from ..conftest import SEQ, SHARED_DATA, read_jsonl, write_beir

pytestmark = pytest.mark.slow  # trains or encodes: left out of `make test-fast`

L2_3 = math.log2(3)  # discount at rank 2; rank 1 is log2(2) = 1, rank 3 is log2(4) = 2


def test_metrics_against_hand_computed_values():
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d3": 0},  # graded
        "q2": {"d5": 1, "d6": 1},  # one of two relevant retrieved
        "q3": {"d9": 0},  # no judgment >= 1: not evaluated
        "q4": {"d7": 1},  # judged but absent from the run: 0 everywhere
        "q5": {"n120": 1},  # relevant at rank 120
        "q6": {"a": 1},  # tied scores
    }
    run = {
        "q1": {"d3": 0.9, "d2": 0.8, "d1": 0.5, "d4": 0.1},
        "q2": {"x1": 0.9, "x2": 0.8, "d5": 0.7},
        "q3": {"d9": 1.0},
        "q5": {f"n{r:03d}": 1.0 - r / 1000 for r in range(1, 151)},
        "q6": {"a": 1.0, "b": 1.0},
        "unjudged": {"d1": 1.0},
    }
    aggregate, per_query = compute_metrics(run, qrels)
    assert list(per_query) == ["q1", "q2", "q4", "q5", "q6"] == relevant_queries(qrels)

    # q1: ranking d3 (0), d2 (1), d1 (2). DCG = 0/1 + 1/log2(3) + 2/log2(4); ideal d1, d2: 2/1 + 1/log2(3)
    q1_ndcg = (1 / L2_3 + 2 / 2) / (2 + 1 / L2_3)  # = 1.63093 / 2.63093 = 0.61991
    assert per_query["q1"]["ndcg@10"] == pytest.approx(q1_ndcg)
    assert per_query["q1"]["mrr@10"] == pytest.approx(1 / 2)  # first grade >= 1 at rank 2
    assert per_query["q1"]["recall@100"] == per_query["q1"]["recall@1000"] == 1.0  # d1 and d2 retrieved

    # q2: d5 at rank 3, d6 not retrieved. DCG = 1/log2(4) = 0.5; ideal 1/1 + 1/log2(3) = 1.63093
    q2_ndcg = 0.5 / (1 + 1 / L2_3)  # = 0.30657
    assert per_query["q2"]["ndcg@10"] == pytest.approx(q2_ndcg)
    assert per_query["q2"]["mrr@10"] == pytest.approx(1 / 3)
    assert per_query["q2"]["recall@100"] == per_query["q2"]["recall@1000"] == 0.5

    assert per_query["q4"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0, "recall@1000": 0.0}

    # q5: the relevant document is at rank 120: outside the top 10 and the top 100, inside the top 1000
    assert per_query["q5"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0, "recall@1000": 1.0}

    # q6: a tie is broken by document id descending (trec_eval's order): b at rank 1, a at rank 2,
    # and every metric sees that same order. DCG = 1/log2(3), ideal 1
    assert per_query["q6"]["ndcg@10"] == pytest.approx(1 / L2_3)  # = 0.63093
    assert per_query["q6"]["mrr@10"] == pytest.approx(1 / 2)

    assert aggregate["ndcg@10"] == pytest.approx((q1_ndcg + q2_ndcg + 0 + 0 + 1 / L2_3) / 5)  # = 0.31148
    assert aggregate["mrr@10"] == pytest.approx((1 / 2 + 1 / 3 + 0 + 0 + 1 / 2) / 5)  # = 0.26667
    assert aggregate["recall@100"] == pytest.approx((1 + 0.5 + 0 + 0 + 1) / 5)  # = 0.5
    assert aggregate["recall@1000"] == pytest.approx((1 + 0.5 + 0 + 1 + 1) / 5)  # = 0.7


def test_aggregate_is_ir_measures_mean_when_every_query_is_retrieved():
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}
    run = {"q1": {"d2": 0.9, "d9": 0.8, "d1": 0.7}, "q2": {"d8": 0.9, "d3": 0.1}}
    aggregate, _ = compute_metrics(run, qrels)
    expected = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.R @ 100], qrels, run)
    assert aggregate["ndcg@10"] == pytest.approx(expected[ir_measures.nDCG @ 10])
    assert aggregate["recall@100"] == pytest.approx(expected[ir_measures.R @ 100])


def test_metrics_need_a_relevant_judgment():
    with pytest.raises(MprError, match="no query"):
        compute_metrics({"q": {"d": 1.0}}, {"q": {"d": 0}})


def test_paired_tests_exact_and_degenerate():
    # differences 1, 2, 3 (mean 2): of the 8 sign flips only +++ and --- reach |mean| >= 2, so p = 2/8
    p_t, p_r = paired_tests([1, 2, 3], [0, 0, 0])
    assert p_r == pytest.approx(0.25)
    t = 2 / (1 / math.sqrt(3))  # mean / (sd / sqrt(n)), sd of (1, 2, 3) = 1
    assert p_t == pytest.approx(2 * stats.t.sf(t, df=2))  # = 0.0742
    assert paired_tests([0.5, 0.2, 0.1], [0.5, 0.2, 0.1]) == (1.0, 1.0)
    assert paired_tests([0.5], [0.1]) == (None, None)


def test_paired_randomization_test_sampled():
    a = [0.6 + 0.01 * (i % 5) for i in range(40)]
    b = [0.5 + 0.01 * (i % 7) for i in range(40)]
    p_t, p_r = paired_tests(a, b)
    assert p_t is not None and p_t < 1e-6
    assert p_r == pytest.approx(1 / 10_001)  # no sign flip reaches the observed mean: (0 + 1) / (samples + 1)
    assert paired_tests(a, b) == (p_t, p_r)  # seeded
    _, p_null = paired_tests([0.5, 0.6] * 20, [0.6, 0.5] * 20)
    assert p_null == 1.0  # mean difference 0: every sign flip is at least as extreme


N_QUERIES, N_FILLER, DEPTH = 40, 400, 200


def write_scifact_test_slice(root: Path, n_queries: int, n_filler: int) -> tuple[Path, list[str]]:
    """The first judged SciFact test queries, their positives and filler documents; plus unjudged
    queries and a query judged only with grade 0, neither of which may count."""
    src = SHARED_DATA / "scifact"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    rows = [line.split("\t") for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(q for q, _, _ in rows))[:n_queries]
    qrels = [(q, d, int(s)) for q, d, s in rows if q in qids]
    needed = {d for _, d, _ in qrels}
    corpus = read_jsonl(src / "corpus.jsonl")
    docs = [d for d in corpus if d["_id"] in needed]
    docs += [d for d in corpus if d["_id"] not in needed][:n_filler]
    queries = read_jsonl(src / "queries.jsonl")
    test_qids = {q for q, _, _ in rows}
    extra = [q for q in queries if q["_id"] not in test_qids][:6]
    qrels.append((extra[0]["_id"], docs[-1]["_id"], 0))
    write_beir(root, docs, [q for q in queries if q["_id"] in set(qids)] + extra, {"test": qrels})
    return root, qids


@pytest.fixture(scope="module")
def scifact_test_slice(tmp_path_factory) -> tuple[Path, list[str]]:
    return write_scifact_test_slice(tmp_path_factory.mktemp("data") / "scifact-test", N_QUERIES, N_FILLER)


@pytest.fixture(scope="module")
def evaluated(scifact_test_slice, tmp_path_factory) -> tuple[EvalReport, Path, Path]:
    root, _ = scifact_test_slice
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(
        model="sentence-transformers/all-MiniLM-L6-v2",
        baseline="sentence-transformers/all-MiniLM-L6-v2",
        data=root,
        split="test",
        max_seq_length=SEQ,
        depth=DEPTH,
        cache_dir=out / "cache",
        run_out=out / "run.trec",
        json_out=out / "report.json",
        progress=False,
    )
    return evaluate.run(cfg, log=lambda _: None), out / "run.trec", out / "report.json"


@pytest.mark.slow
def test_end_to_end_report(evaluated, scifact_test_slice):
    report, _, json_out = evaluated
    _, qids = scifact_test_slice
    assert report.queries == N_QUERIES and report.skipped_queries == 1
    assert list(report.result.per_query) == qids
    assert report.depth == DEPTH and report.corpus_size >= N_FILLER
    for key, value in report.result.metrics.items():
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(sum(m[key] for m in report.result.per_query.values()) / N_QUERIES)
    assert (
        report.result.metrics["ndcg@10"] > 0.5
    )  # MiniLM on SciFact, with an easier corpus than the full one
    assert report.result.metrics["recall@100"] >= report.result.metrics["ndcg@10"] - 0.2
    assert report.result.corpus_encoded == report.corpus_size
    assert EvalReport.model_validate_json(json_out.read_text()) == report


@pytest.mark.slow
def test_end_to_end_run_file(evaluated, scifact_test_slice):
    report, run_out, _ = evaluated
    _, qids = scifact_test_slice
    run: dict[str, dict[str, float]] = {}
    last: dict[str, tuple[int, float]] = {}
    for line in run_out.read_text().splitlines():
        qid, q0, pid, rank, score, tag = line.split(" ")
        assert q0 == "Q0" and tag == "sentence-transformers/all-MiniLM-L6-v2"
        prev_rank, prev_score = last.get(qid, (0, math.inf))
        assert int(rank) == prev_rank + 1 and float(score) <= prev_score
        last[qid] = (int(rank), float(score))
        run.setdefault(qid, {})[pid] = float(score)
    assert list(run) == qids
    assert all(len(docs) == DEPTH for docs in run.values())
    aggregate, _ = compute_metrics(
        run, _slice_qrels(scifact_test_slice)
    )  # the run file reproduces the report
    assert aggregate == pytest.approx(report.result.metrics)


def _slice_qrels(scifact_test_slice) -> dict[str, dict[str, int]]:
    root, _ = scifact_test_slice
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    return qrels


@pytest.mark.slow
def test_baseline_same_model(evaluated):
    report, _, _ = evaluated
    assert report.baseline is not None
    assert report.baseline.corpus_cached == report.corpus_size  # the main model's cached embeddings
    assert [c.metric for c in report.comparison] == ["ndcg@10", "mrr@10", "recall@100", "recall@1000"]
    for c in report.comparison:
        assert c.delta == 0.0 and c.p_ttest == 1.0 and c.p_randomization == 1.0
    table = format_table(report)
    assert "MRR@10" in table and "delta" in table and "p t-test" in table and "randomization" in table
    plain = format_table(report.model_copy(update={"baseline": None, "comparison": [], "significance": None}))
    assert "delta" not in plain and "nDCG@10" in plain and "Recall@1000" in plain


@pytest.mark.slow
def test_ir_evaluator_matches_evaluate(encoder_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    root, _ = write_scifact_test_slice(tmp_path / "small", 10, 80)
    cfg = EvalConfig(data=root, max_seq_length=SEQ, depth=50, no_cache=True, progress=False)
    expected = evaluate.run(cfg, log=lambda _: None).result.metrics
    model = SentenceTransformer(encoder_path, device="cpu")
    model.max_seq_length = SEQ
    evaluator = IREvaluator(root, "test", name="scifact", depth=50)
    metrics = evaluator(model, output_path=str(tmp_path / "out"), epoch=1, steps=10)
    assert evaluator.primary_metric == "scifact_ndcg@10"
    assert metrics == pytest.approx({f"scifact_{key}": value for key, value in expected.items()}, abs=1e-6)
    assert (
        (tmp_path / "out" / "IR_evaluation_scifact_results.csv").read_text().startswith("epoch,steps,ndcg@10")
    )


def test_missing_split_and_model(tmp_path):
    root = write_beir(
        tmp_path / "tiny",
        [{"_id": "d1", "title": "", "text": "a document"}],
        [{"_id": "q1", "text": "a query"}],
        {"test": [("q1", "d1", 1)]},
    )
    with pytest.raises(MprError, match="split 'dev' does not exist"):
        evaluate.run(EvalConfig(data=root, split="dev", progress=False), log=lambda _: None)
    with pytest.raises(MprError, match="no-such-model: no such folder"):
        evaluate.run(
            EvalConfig(model=str(tmp_path / "no-such-model"), data=root, no_cache=True, progress=False),
            log=lambda _: None,
        )
    with pytest.raises(MprError, match="no such data folder"):
        evaluate.run(EvalConfig(data=tmp_path / "absent", progress=False), log=lambda _: None)
