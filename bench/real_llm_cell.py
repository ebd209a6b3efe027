"""One loss-study cell trained on a real judge's labels, next to the study's simulated judge at the error rate
the real judge actually made.

    python bench/real_llm_cell.py --data PATH/vaswani [--fold 0] [--loss lsepair]

The cell is the study's own (`mpr.orchestrate.study`: the same fold, mined candidates, relabel options,
training and evaluation settings as the committed study in bench/results/study): fold FOLD of the 5-fold
split, trained on the fold's sparse training qrels (one positive kept per query) after relabeling the 20 mined
hard negatives of every training query. Four models are evaluated on the fold's held-out queries:

- zero-shot, and the baseline (InfoNCE on the mined data, not relabeled);
- LOSS on SmolLM2-135M-Instruct's listwise verdicts (`llama-server` through mpr's harness, default options);
- LOSS on the simulated judge's verdicts at the real judge's measured error rate (the share of judged pairs
  whose verdict disagrees with the collection's full qrels), which flips pairs uniformly at random.

Each result goes to bench/results/real_llm/study_cell/DATASET-foldF/NAME.json as soon as it exists (a rerun
skips it), and `--report` (also run at the end) writes study_cell.md beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpr.llama.build import ensure_binary, ensure_default_model  # noqa: E402
from mpr.llama.server import LlamaServer  # noqa: E402
from mpr.orchestrate.experiment import run_stage  # noqa: E402
from mpr.orchestrate.stages import RELABEL  # noqa: E402
from mpr.orchestrate.study import (  # noqa: E402
    BASELINE,
    LISTWISE,
    ZERO_SHOT,
    Cell,
    Paths,
    Study,
    StudyConfig,
    judge_stats,
    pooled_qrels,
)
from pipeline.retrieval.metrics import paired_tests  # noqa: E402

ALIAS = "SmolLM2-135M-Instruct"
# the settings of the committed study (bench/results/study/*/study.md)
STUDY = {
    "steps": 30,
    "batch_size": 8,
    "group_size": 6,
    "max_positives": 3,
    "learning_rate": 5e-5,
    "max_seq_length": 96,
    "memory_budget": "6GB",
}


def judge_errors(folder: Path, full: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The judge's verdicts on the mined candidates against the collection's full qrels."""
    tp = fp = fn = tn = 0
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["qid", "pid", "llm_label", "source"])
        for qid, pid, label, source in zip(
            *(table.column(c).to_pylist() for c in ("qid", "pid", "llm_label", "source"))
        ):
            if label is None or source != "mined":
                continue
            relevant = full.get(qid, {}).get(pid, 0) > 0
            tp, fp, fn, tn = (
                tp + (relevant and label == 1),
                fp + (not relevant and label == 1),
                fn + (relevant and label == 0),
                tn + (not relevant and label == 0),
            )
    judged = tp + fp + fn + tn
    return {
        "judged": judged,
        "hidden_positives": tp + fn,
        "flagged": tp + fp,
        "error_rate": round((fp + fn) / judged, 4) if judged else None,
        "false_negative_rate": round(fn / (tp + fn), 4) if tp + fn else None,
        "false_positive_rate": round(fp / (fp + tn), 4) if fp + tn else None,
    }


def study_config(data: Path, work: Path, fold: int, loss: str, error_rate: float) -> StudyConfig:
    return StudyConfig(
        data=[data],
        out=work / "out",
        work=work,
        fold_ids=[fold],
        losses=[loss],
        error_rates=[error_rate],  # type: ignore[arg-type]
        **STUDY,
    )


def cell_result(study: Study, cell: Cell, data: Path | None) -> dict[str, Any]:
    """Train (unless zero-shot) and evaluate one model with the study's settings."""
    started = time.perf_counter()
    if data is None:
        evaluated = study.evaluate(cell, study.cfg.model, cached=True)
        trained = None
    else:
        model, trained = study.train(cell, data)
        evaluated = study.evaluate(cell, str(model), cached=False)
    return {
        "cell": cell.file_name,
        "train_data": str(data) if data else None,
        "judge": judge_stats(data) if data else None,
        "train": trained,
        "eval": evaluated,
        "seconds": round(time.perf_counter() - started, 1),
    }


def report(results: Path) -> str:
    lines = [
        "# One study cell on a real judge's labels",
        "",
        "Written by `python bench/real_llm_cell.py --report` from the JSON files beside it. "
        f"The study's settings ({', '.join(f'{k} {v}' for k, v in STUDY.items())}); "
        "nDCG@10 on the fold's held-out queries; Δ and p (paired randomization test over those queries) "
        "against the simulated judge at the matching error rate.",
        "",
    ]
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        got = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
        meta = got.pop("judges", None)
        if not meta:
            continue
        lines += [
            f"## {folder.name}",
            "",
            f"Command: `{meta['command']}`",
            "",
            "| model | judge | judge error rate (FNR / FPR) | flagged / judged "
            "| nDCG@10 | R@100 | Δ vs simulated | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sim = got.get("simulated")
        for name in ("zero_shot", "baseline", "real", "simulated"):
            row = got.get(name)
            if row is None:
                continue
            err = meta.get(name)
            judge = {"real": ALIAS, "simulated": f"simulated, e={meta['matched_error_rate']:.2f}"}.get(
                name, "–"
            )
            rate = (
                f"{err['error_rate']:.3f} "
                f"({err['false_negative_rate']:.2f} / {err['false_positive_rate']:.2f})"
                if err
                else "–"
            )
            flagged = f"{err['flagged']:,} / {err['judged']:,}" if err else "–"
            m = row["eval"]["metrics"]
            delta = p = "–"
            if sim is not None and name != "simulated":
                a, b = row["eval"]["per_query_ndcg@10"], sim["eval"]["per_query_ndcg@10"]
                common = sorted(set(a) & set(b))
                delta = f"{m['ndcg@10'] - sim['eval']['metrics']['ndcg@10']:+.4f}"
                p = f"{paired_tests([a[q] for q in common], [b[q] for q in common])[1]:.3f}"
            lines.append(
                f"| {name.replace('_', '-')} | {judge} | {rate} | {flagged} "
                f"| {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {delta} | {p} |"
            )
        queries = len(next(iter(got.values()))["eval"]["per_query_ndcg@10"])
        hidden = meta["real"]["hidden_positives"]
        lines += [
            "",
            f"{queries} held-out queries; {hidden:,} of the judged candidates are hidden positives.",
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--loss", default="lsepair")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mpr-real-llm-cell"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "real_llm" / "study_cell")
    ap.add_argument("--report", action="store_true", help="only rewrite study_cell.md from the JSON files")
    args = ap.parse_args()
    if not args.report:
        run(args)
    (args.results.parent / "study_cell.md").write_text(report(args.results))


def run(args: argparse.Namespace) -> None:
    data = args.data.resolve()
    dataset = data.name
    results = args.results / f"{dataset}-fold{args.fold}"
    results.mkdir(parents=True, exist_ok=True)
    work = args.work / dataset
    command = "python bench/real_llm_cell.py " + " ".join(sys.argv[1:])
    log = lambda m: print(m, flush=True)  # noqa: E731

    with ExitStack() as stack:

        def open_study(error_rate: float) -> Study:
            cfg = study_config(data, work, args.fold, args.loss, error_rate)
            return Study(cfg, cfg.sources, Paths(work / "out", work), False, stack, command, log=log)

        # the real judge first: its measured error rate is the simulated judge's
        probe = open_study(0.0)
        full = pooled_qrels(probe.cfg.sources[dataset])
        mined = probe.mined(dataset, args.fold)
        real_out = work / f"fold{args.fold}" / "relabel-smollm2"
        if not (real_out / "_manifest.json").exists():
            server = stack.enter_context(
                LlamaServer(
                    ensure_binary(None, build=True, log=log),
                    ensure_default_model(log=log),
                    alias=ALIAS,
                    log_path=work / "server.log",
                )
            )
            run_stage(
                RELABEL, probe.relabel_config(mined, real_out, ALIAS, server.base_url, LISTWISE), log=log
            )
            server.stop()
        real_err = judge_errors(real_out, full)
        matched = round(real_err["error_rate"], 2)
        log(f"real judge: {real_err}; the simulated judge runs at e={matched:.2f}")

        study = open_study(matched)
        sim_out = study.relabeled(dataset, args.fold, matched, graded=False)
        meta = {
            "command": command,
            "matched_error_rate": matched,
            "real": real_err,
            "simulated": judge_errors(sim_out, full),
            "dataset": dataset,
            "fold": args.fold,
            "loss": args.loss,
        }
        (results / "judges.json").write_text(json.dumps(meta, indent=1))
        todo = {
            "zero_shot": (Cell(dataset, args.fold, ZERO_SHOT), None),
            "baseline": (Cell(dataset, args.fold, BASELINE), mined),
            "real": (Cell(dataset, args.fold, args.loss), real_out),
            "simulated": (Cell(dataset, args.fold, args.loss, matched), sim_out),
        }
        for name, (cell, folder) in todo.items():
            path = results / f"{name}.json"
            if path.exists():
                continue
            got = cell_result(study, cell, folder)
            path.write_text(json.dumps(got, indent=1))
            log(f"{name}: nDCG@10 {got['eval']['metrics']['ndcg@10']:.4f} ({got['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
