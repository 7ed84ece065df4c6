"""Evaluation metrics, written out so the tests can check them by hand.

Retrieval follows trec_eval (as BEIR and MTEB report it): nDCG@k with linear
gains rel_i / log2(i + 1) over the ranked list and the ideal ordering of all
judged documents; Recall@k = relevant retrieved in the top k / all relevant
(rel > 0); MRR@k = 1 / rank of the first relevant document within the top k,
else 0. Scores are averaged over queries that have at least one relevant
document, and reported x100.
"""

from __future__ import annotations

import math

import numpy as np


def spearman(predicted, gold) -> float:
    """Spearman rank correlation x100."""
    from scipy.stats import spearmanr  # scipy.stats takes a second to import; only evaluation needs it

    return float(spearmanr(np.asarray(predicted), np.asarray(gold)).statistic) * 100


def ndcg_at_k(ranked: list[str], qrels: dict[str, float], k: int = 10) -> float:
    dcg = sum(qrels.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], qrels: dict[str, float], k: int = 10) -> float:
    relevant = {doc for doc, g in qrels.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: list[str], qrels: dict[str, float], k: int = 10) -> float:
    for rank, doc in enumerate(ranked[:k]):
        if qrels.get(doc, 0.0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def retrieval_scores(rankings: dict[str, list[str]], qrels: dict[str, dict[str, float]], k: int = 10) -> dict:
    """Mean nDCG@k, Recall@k and MRR@k (x100) over queries with a relevant document."""
    judged = [q for q in rankings if any(g > 0 for g in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no query has a relevant document in the qrels")
    return {
        f"ndcg@{k}": 100 * float(np.mean([ndcg_at_k(rankings[q], qrels[q], k) for q in judged])),
        f"recall@{k}": 100 * float(np.mean([recall_at_k(rankings[q], qrels[q], k) for q in judged])),
        f"mrr@{k}": 100 * float(np.mean([mrr_at_k(rankings[q], qrels[q], k) for q in judged])),
    }
