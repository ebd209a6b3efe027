"""Retrieval helpers that stages, training and orchestration share: the encoder and its embedding cache
(`encode`), exact, FAISS and BM25 search (`search`), IR metrics and paired tests (`metrics`), and the
evaluator sentence-transformers' trainer calls (`ir_evaluator`)."""
