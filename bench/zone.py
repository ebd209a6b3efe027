"""Ambiguity-zone judging: false negatives found against candidates judged (bench/README.md).

Setup (bench/zone_prepare.py): per query one qrels positive is kept, the candidates are mined with
all-MiniLM-L6-v2 (depth 30, max_seq_length 128), and the query's other qrels positives are the hidden
false negatives. Each setting runs `mpr relabel --candidates all` end to end against the simulated
judge (the oracle test server answering from the full qrels, error rate 0): judging every candidate
finds every hidden positive among the candidates, and a zone finds those it sends to the judge.

    python bench/zone.py --work /tmp/zone --shared data/beir --datasets cisi vaswani --out bench/results/zone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mpr.simulated_judge import Oracle, start_server
from pipeline.data.shards import read_shards
from pipeline.stages import relabel
from pipeline.stages.relabel import RelabelConfig

MODEL, CHEAP = "judge", "cheap-judge"
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3)
TOPS = (1, 2, 3, 5, 8, 10, 12, 15, 20, 25)
UNSURE = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
CHEAP_ERROR = 0.2


def run_setting(
    mined: Path, out: Path, url: str, cache: Path, hidden: set[tuple[str, str]], **zone: Any
) -> dict[str, Any]:
    cfg = RelabelConfig(
        input=mined,
        out=out,
        model=MODEL,
        base_url=[url],
        candidates="all",
        max_candidates=100,
        llm_cache=cache,
        progress=False,
        overwrite=True,
        **zone,
    )
    manifest = relabel.run(cfg, log=lambda _: None)
    df = read_shards(out, columns=["qid", "pid", "source", "label", "llm_label", "unjudged"]).to_pandas()
    cand = df[df.source == "mined"]
    flagged = cand[cand.label == 1]
    s = manifest.summary
    return {
        **zone,
        "candidates": len(cand),
        "judged": int(s["judged"]),
        "found": len(set(zip(flagged.qid, flagged.pid)) & hidden),
        "false_flags": len(set(zip(flagged.qid, flagged.pid)) - hidden),
        "cheap_requests": int(s.get("zone_sent", 0) + s.get("zone_cache_hits", 0)),
    }


def bench(work: Path, name: str, data: Path, out: Path) -> dict[str, Any]:
    """`data`: the original BEIR folder, whose full qrels the oracle answers from."""
    root = work / name
    mined = root / "mined"
    hidden = {tuple(x) for x in json.loads((root / "hidden.json").read_text())}
    table = read_shards(mined, columns=["qid", "pid", "source", "label"]).to_pandas()
    cand = table[(table.source == "mined") & (table.label != 1)]
    in_candidates = hidden & set(zip(cand.qid, cand.pid))
    results: dict[str, Any] = {
        "dataset": name,
        "queries": int(table.qid.nunique()),
        "candidates": len(cand),
        "hidden_positives": len(hidden),
        "hidden_in_candidates": len(in_candidates),
        "settings": {},
    }
    started = time.perf_counter()
    runs = root / "runs"
    for calibrated in (True, False):
        oracle = Oracle(
            data, model_error_rates={CHEAP: CHEAP_ERROR}, error_confidence=0.5 if calibrated else 0.85
        )
        with start_server(responder=oracle, models=(MODEL, CHEAP)) as server:
            cache = runs / f"llm-{calibrated}.sqlite"
            if calibrated:
                results["settings"]["all"] = [run_setting(mined, runs / "all", server.url, cache, hidden)]
                results["settings"]["margin"] = [
                    run_setting(
                        mined, runs / f"m{m}", server.url, cache, hidden, zone="margin", zone_margin=m
                    )
                    for m in MARGINS
                ]
                results["settings"]["top"] = [
                    run_setting(mined, runs / f"t{r}", server.url, cache, hidden, zone="top", zone_top=r)
                    for r in TOPS
                ]
            key = "unsure" if calibrated else "unsure_overconfident"
            results["settings"][key] = [
                run_setting(
                    mined,
                    runs / f"u{u}-{calibrated}",
                    server.url,
                    cache,
                    hidden,
                    zone="unsure",
                    zone_model=CHEAP,
                    zone_unsure=u,
                )
                for u in UNSURE
            ]
    results["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def plot(all_results: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], all_results):
        full = res["settings"]["all"][0]
        for key, label, marker in (
            ("margin", "score margin", "o"),
            ("top", "top-r", "s"),
            ("unsure", "cheap judge unsure (calibrated)", "^"),
            ("unsure_overconfident", "cheap judge unsure (overconfident)", "v"),
        ):
            pts = [(s["judged"] / full["judged"], s["found"] / full["found"]) for s in res["settings"][key]]
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=4, label=label)
        ax.axhline(0.95, color="grey", lw=0.7, ls="--")
        ax.axvline(0.5, color="grey", lw=0.7, ls="--")
        ax.set_xlabel("candidates judged (share of judging all)")
        ax.set_ylabel("false negatives found (share of judging all)")
        ax.set_title(
            f"{res['dataset']}: {res['queries']} queries, "
            f"{full['found']} hidden positives among {full['candidates']} candidates",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def table(all_results: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | zone | setting | judged | share judged | found | share found | false flags |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in all_results:
        full = res["settings"]["all"][0]
        for key, rows in res["settings"].items():
            for s in rows:
                setting = {"margin": s.get("zone_margin"), "top": s.get("zone_top")}.get(
                    key, s.get("zone_unsure", "-")
                )
                lines.append(
                    f"| {res['dataset']} | {key} | {setting} | {s['judged']} "
                    f"| {s['judged'] / full['judged']:.3f} | {s['found']} | "
                    f"{s['found'] / full['found']:.3f} | {s['false_flags']} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", type=Path, required=True, help="folder of bench/zone_prepare.py runs, one per dataset"
    )
    ap.add_argument("--datasets", nargs="+", default=["cisi", "vaswani"])
    ap.add_argument(
        "--shared", type=Path, default=Path("data/beir"), help="the BEIR folders, one per dataset"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/zone"))
    args = ap.parse_args()
    results = [bench(args.work, name, args.shared / name, args.out) for name in args.datasets]
    plot(results, args.out / "curve.png")
    (args.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
