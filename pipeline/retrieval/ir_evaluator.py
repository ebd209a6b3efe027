"""`IREvaluator`: the metrics of `mpr eval` on a BEIR split, for sentence-transformers' trainer."""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

from pipeline.data.readers import BeirDataset, load_beir
from pipeline.errors import MprError
from pipeline.retrieval.encode import ENCODE_DEFAULTS, Encoder
from pipeline.retrieval.metrics import (
    DEFAULT_DEPTH,
    MEASURES,
    PRIMARY,
    compute_metrics,
    relevant_queries,
    retrieve,
)


def __getattr__(name: str) -> Any:
    """`IREvaluator` is built on first use: sentence-transformers takes seconds to import, and `mpr eval`
    checks its inputs before paying for it."""
    if name == "IREvaluator":
        return _ir_evaluator()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _ir_evaluator() -> type:
    import importlib

    try:  # sentence-transformers >= 6
        evaluation = importlib.import_module("sentence_transformers.base.evaluation")
    except ImportError:  # pragma: no cover - sentence-transformers 5.x
        evaluation = importlib.import_module("sentence_transformers.evaluation")
    base: Any = evaluation.SentenceEvaluator

    class IREvaluator(base):
        """nDCG@10 (primary), MRR@10, Recall@100 and Recall@1000 on a BEIR split, for
        SentenceTransformerTrainer.

        Each call encodes the corpus and the evaluated queries afresh with the model being trained (no cache)
        and scores exactly as `evaluate` does. Prompts resolve as in `Encoder.load`: explicit text, else the
        named prompt, else the model's "query" / "document" ("passage") prompts.
        """

        def __init__(
            self,
            data: str | Path | BeirDataset,
            split: str = "test",
            *,
            name: str = "",
            depth: int = DEFAULT_DEPTH,
            max_queries: int | None = None,
            batch_size: int = ENCODE_DEFAULTS.batch_size,
            query_prompt: str | None = None,
            query_prompt_name: str | None = None,
            passage_prompt: str | None = None,
            passage_prompt_name: str | None = None,
            show_progress_bar: bool = False,
            write_csv: bool = True,
        ):
            super().__init__()
            self.ds = data if isinstance(data, BeirDataset) else load_beir(data, split)
            self.qids = relevant_queries(self.ds.qrels)[:max_queries]
            if not self.qids:
                raise MprError(f"{self.ds.files.get('qrels', self.ds.root)}: no query has a judgment >= 1")
            self.passages = [self.ds.corpus.full_text(i) for i in range(len(self.ds.corpus))]
            self.qrels = {q: self.ds.qrels[q] for q in self.qids}
            self.name = name
            self.depth = min(depth, len(self.ds.corpus))
            self.batch_size = batch_size
            self.query_prompt, self.query_prompt_name = query_prompt, query_prompt_name
            self.passage_prompt, self.passage_prompt_name = passage_prompt, passage_prompt_name
            self.show_progress_bar = show_progress_bar
            self.write_csv = write_csv
            self.csv_file = f"IR_evaluation{'_' + name if name else ''}_results.csv"
            self.primary_metric = PRIMARY

        def _encoder(self, model: Any) -> Encoder:
            return Encoder.from_model(
                "<training>",
                model,
                query_prompt=self.query_prompt,
                query_prompt_name=self.query_prompt_name,
                passage_prompt=self.passage_prompt,
                passage_prompt_name=self.passage_prompt_name,
                batch_size=self.batch_size,
            )

        def __call__(
            self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
        ) -> dict[str, float]:
            seconds: dict[str, float] = {}
            ranked, _ = retrieve(
                self._encoder(model), self.ds, self.qids, self.depth,
                cache_dir=None, progress=self.show_progress_bar, seconds=seconds, passages=self.passages,
            )  # fmt: skip
            aggregate, _ = compute_metrics({q: dict(r) for q, r in ranked.items()}, self.qrels)
            if output_path is not None and self.write_csv:
                path = Path(output_path) / self.csv_file
                path.parent.mkdir(parents=True, exist_ok=True)
                new = not path.exists()
                with open(path, "a", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    if new:
                        writer.writerow(["epoch", "steps", *MEASURES])
                    writer.writerow([epoch, steps, *(aggregate[k] for k in MEASURES)])
            metrics = self.prefix_name_to_metrics(aggregate, self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

        def get_config_dict(self) -> dict[str, Any]:
            return {
                "split": self.ds.split,
                "queries": len(self.qids),
                "corpus_size": len(self.passages),
                "depth": self.depth,
            }

    IREvaluator.__qualname__ = "IREvaluator"
    return IREvaluator
