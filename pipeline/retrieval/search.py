"""Candidate retrieval: exact dense search in bounded memory, FAISS (optional), BM25 (bm25s)."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from pipeline.errors import MprError

CORPUS_CHUNK = 32768


def exact_topk(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    corpus_chunk: int = CORPUS_CHUNK,
    progress: bool = False,
    desc: str = "search",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of every query against the corpus, as (indices, scores), best first.

    The corpus is scanned in chunks and a running top-k is merged, so memory stays at
    |queries| x (k + corpus_chunk) scores; the full query x corpus matrix is never built.
    """
    import torch  # here, not at the top: `mpr mine` reads and checks its inputs before paying for torch

    k = min(k, len(corpus))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), 0), float("-inf"))
    best_idx = torch.zeros((len(q), 0), dtype=torch.long)
    starts = range(0, len(corpus), corpus_chunk)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress, leave=False):
        block = torch.from_numpy(np.ascontiguousarray(corpus[start : start + corpus_chunk], dtype=np.float32))
        scores = q @ block.T
        top = min(k, scores.shape[1])
        s, i = torch.topk(scores, top, dim=1)
        merged_scores = torch.cat([best_scores, s], dim=1)
        merged_idx = torch.cat([best_idx, i + start], dim=1)
        best_scores, order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_idx = torch.gather(merged_idx, 1, order)
    return best_idx.numpy(), best_scores.numpy()


class FaissIndex:
    """Exact inner-product search with FAISS (`pip install "mpr[faiss]"`), for large corpora."""

    def __init__(self, corpus: np.ndarray):
        try:
            import faiss
        except ImportError:
            raise MprError('--faiss needs FAISS: pip install "mpr[faiss]"') from None
        self.index = faiss.IndexFlatIP(corpus.shape[1])
        self.index.add(np.ascontiguousarray(corpus, dtype=np.float32))

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(
            np.ascontiguousarray(queries, dtype=np.float32), min(k, self.index.ntotal)
        )
        return idx, scores


class BM25Index:
    """BM25 over the corpus with bm25s (English stopwords, lower-cased)."""

    def __init__(self, texts: list[str], *, progress: bool = False):
        import bm25s

        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(
            bm25s.tokenize(texts, stopwords="en", show_progress=progress), show_progress=progress
        )
        self.size = len(texts)

    def topk(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        idx, scores = self.retriever.retrieve(tokens, k=min(k, self.size), show_progress=False, n_threads=0)
        return np.asarray(idx), np.asarray(scores, dtype=np.float32)

    def scores(self, query: str, doc_indices: list[int]) -> np.ndarray:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)[doc_indices]
