"""The judge audit on sparse labels, with judges whose errors are known: the simulated judge answering from
the full qrels, without errors and wrong on 40% of its answers, on the sparse collections that
`bench/real_llm.py` mined (one qrels positive kept per query, the others hidden among the candidates).

    python bench/audit_simulated.py --data PATH/cisi --mined /tmp/mpr-real-llm/cisi/mined-all --name cisi

An error-free judge must pass at --min-agreement 0.8, and the 40% one must be stopped at the default (0.4).
Results: bench/results/real_llm/NAME/audit_simulated.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpr.simulated_judge import Oracle, start_server  # noqa: E402
from pipeline.stages import relabel  # noqa: E402
from pipeline.stages.audit import AUDIT_FILE, AuditFailed  # noqa: E402
from pipeline.stages.relabel import RelabelConfig  # noqa: E402

KEYS = (
    "positives",
    "negatives",
    "likely_negatives",
    "failed",
    "recall",
    "recall_ci",
    "false_positive_rate",
    "false_positive_rate_ci",
    "kappa",
    "kappa_ci",
    "likely_flag_rate",
    "likely_flag_rate_ci",
    "unlabelled_positive_estimate",
    "min_agreement",
    "passed",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--mined", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--audit", type=int, default=50)
    args = ap.parse_args()
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for error_rate, min_agreement in ((0.0, 0.8), (0.4, 0.4)):
            folder = Path(tmp) / f"e{error_rate}"
            with start_server(
                responder=Oracle(args.data, error_rate=error_rate), models=("judge",)
            ) as server:
                cfg = RelabelConfig(
                    input=args.mined,
                    out=folder,
                    model="judge",
                    base_url=[server.url],
                    progress=False,
                    llm_cache=Path(tmp) / "llm.sqlite",
                    audit=args.audit,
                    min_agreement=min_agreement,
                )
                with contextlib.suppress(AuditFailed):  # the judge that should be stopped
                    relabel.run(cfg, log=lambda _: None)
            result = json.loads((folder / AUDIT_FILE).read_text())
            out[f"error_rate={error_rate}"] = {k: result.get(k) for k in KEYS}
            print(
                args.name,
                error_rate,
                {k: result.get(k) for k in ("recall", "false_positive_rate", "kappa", "passed")},
            )
    target = REPO / "bench" / "results" / "real_llm" / args.name / "audit_simulated.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "command": f"python bench/audit_simulated.py --data {args.data.name} --audit {args.audit}",
                **out,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
