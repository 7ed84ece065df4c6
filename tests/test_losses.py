"""Losses against naive references written here, one term at a time."""

import math

import pytest
import torch

from tpembed.modeling.losses import cosent_loss, info_nce_loss, masked_classification_loss, matryoshka_loss


def cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def naive_info_nce(queries, passages, group, tau, query_query=True, removed=lambda i, kind, j: False):
    """The docs/method.md section 6 formula, written as loops over anchors and candidates."""
    total = 0.0
    n = len(queries)
    for i in range(n):
        positive = math.exp(cos(queries[i], passages[i * group]) / tau)
        denominator = 0.0
        for j in range(len(passages)):
            if j == i * group or not removed(i, "passage", j):
                denominator += math.exp(cos(queries[i], passages[j]) / tau)
        if query_query:
            for k in range(n):
                if k != i and not removed(i, "query", k):
                    denominator += math.exp(cos(queries[i], queries[k]) / tau)
        total += -math.log(positive / denominator)
    return total / n


@pytest.fixture
def retrieval_batch():
    torch.manual_seed(0)
    n, group, dim = 5, 3, 16
    queries = torch.randn(n, dim, dtype=torch.float64)
    passages = torch.randn(n * group, dim, dtype=torch.float64)
    return queries, passages, group


def call_info_nce(queries, passages, group, tau, query_query=True, **kwargs):
    n = len(queries)
    return info_nce_loss(
        queries,
        passages,
        torch.arange(n) * group,
        tau,
        anchor_pool=queries if query_query else None,
        anchor_pool_self_indices=torch.arange(n) if query_query else None,
        **kwargs,
    )


@pytest.mark.parametrize("tau", [0.02, 0.05, 1.0])
@pytest.mark.parametrize("query_query", [True, False])
def test_info_nce_matches_naive_loop(retrieval_batch, tau, query_query):
    queries, passages, group = retrieval_batch
    expected = naive_info_nce(queries, passages, group, tau, query_query)
    got = call_info_nce(queries, passages, group, tau, query_query)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_temperature_changes_the_loss(retrieval_batch):
    queries, passages, group = retrieval_batch
    assert float(call_info_nce(queries, passages, group, 0.02)) != pytest.approx(
        float(call_info_nce(queries, passages, group, 0.05))
    )


def test_false_negative_mask_margin_and_identical_text():
    torch.manual_seed(1)
    n, group, dim, tau, margin = 4, 2, 8, 0.05, 0.1
    queries = torch.randn(n, dim, dtype=torch.float64)
    passages = torch.randn(n * group, dim, dtype=torch.float64)
    # make anchor 0's positive weak and another query's positive almost identical to query 0
    passages[0] = queries[0] * 0.2 + torch.randn(dim, dtype=torch.float64)
    passages[1 * group] = queries[0] * 3 + 0.01 * torch.randn(dim, dtype=torch.float64)
    # passage 3 (anchor 1's negative) has the same text as anchor 2's positive (index 4)
    text_ids = torch.arange(n * group)
    text_ids[3] = text_ids[2 * group]

    def removed(i, kind, j):
        pos = cos(queries[i], passages[i * group])
        if kind == "query":
            return cos(queries[i], queries[j]) > pos + margin
        return cos(queries[i], passages[j]) > pos + margin or text_ids[j] == text_ids[i * group]

    assert removed(0, "passage", group), "the constructed false negative should be masked"
    assert removed(2, "passage", 3), "the identical-text candidate should be masked"
    expected = naive_info_nce(queries, passages, group, tau, True, removed)
    got = call_info_nce(queries, passages, group, tau, false_negative_margin=margin, candidate_text_ids=text_ids)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    unmasked = call_info_nce(queries, passages, group, tau)
    assert float(got) < float(unmasked), "masking removes denominator mass"


def test_matryoshka_full_dim_equals_base_and_each_dim_normalised_after_slicing(retrieval_batch):
    queries, passages, group = retrieval_batch
    dims, weights, tau = [4, 8, 16], [0.5, 2.0, 1.0], 0.05

    def task(q, p, pool):
        return call_info_nce(q, p, group, tau)

    total, per_dim = matryoshka_loss(task, [queries, passages, queries], dims, weights)
    for dim in dims:
        # the naive reference normalises the slice itself (cos divides by the slice's norm)
        expected = naive_info_nce(queries[:, :dim], passages[:, :dim], group, tau)
        assert float(per_dim[dim]) == pytest.approx(expected, rel=1e-9)
    assert float(per_dim[16]) == pytest.approx(float(call_info_nce(queries, passages, group, tau)), rel=1e-12)
    assert float(total) == pytest.approx(sum(w * float(per_dim[d]) for d, w in zip(dims, weights)), rel=1e-12)
    # slicing then normalising differs from normalising then slicing
    pre_normalised = torch.nn.functional.normalize(queries, dim=-1)[:, :4]
    assert not torch.allclose(pre_normalised.norm(dim=-1), torch.ones(len(queries), dtype=torch.float64))


def test_matryoshka_default_weights_are_one(retrieval_batch):
    queries, passages, group = retrieval_batch

    def task(q, p):
        return call_info_nce(q, p, group, 0.05, query_query=False)

    total, per_dim = matryoshka_loss(task, [queries, passages], [8, 16])
    assert float(total) == pytest.approx(float(per_dim[8] + per_dim[16]), rel=1e-12)


def test_matryoshka_rejects_dims_beyond_the_embedding(retrieval_batch):
    queries, passages, group = retrieval_batch
    with pytest.raises(ValueError, match="exceeds"):
        matryoshka_loss(lambda q, p: q.sum(), [queries, passages], [8, 32])


def naive_cosent(left, right, scores, tau):
    s = [cos(left[i], right[i]) for i in range(len(left))]
    total = 1.0
    for i in range(len(s)):
        for j in range(len(s)):
            if scores[i] > scores[j]:
                total += math.exp((s[j] - s[i]) / tau)
    return math.log(total)


@pytest.mark.parametrize("tau", [0.02, 0.05])
def test_cosent_matches_naive_double_loop(tau):
    torch.manual_seed(2)
    left = torch.randn(6, 8, dtype=torch.float64)
    right = torch.randn(6, 8, dtype=torch.float64)
    scores = torch.tensor([2.0, 1.0, 0.0, 2.0, 4.5, 1.0], dtype=torch.float64)  # ties are not ordered
    assert float(cosent_loss(left, right, scores, tau)) == pytest.approx(
        naive_cosent(left, right, scores, tau), rel=1e-9
    )


def test_cosent_with_all_scores_equal_is_zero():
    left, right = torch.randn(4, 8), torch.randn(4, 8)
    assert float(cosent_loss(left, right, torch.ones(4), 0.05)) == 0.0


def test_classification_mask_same_label_candidate_has_no_effect():
    torch.manual_seed(3)
    n, group, dim, tau = 4, 3, 8, 0.05
    anchors = torch.randn(n, dim, dtype=torch.float64)
    candidates = torch.randn(n * group, dim, dtype=torch.float64)
    anchor_labels = torch.tensor([0, 1, 2, 0])
    candidate_labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 0, 1, 0, 2, 2])

    def loss(c):
        return masked_classification_loss(
            anchors,
            c,
            torch.arange(n) * group,
            anchor_labels,
            candidate_labels,
            tau,
            anchor_pool=anchors,
            anchor_pool_labels=anchor_labels,
            anchor_pool_self_indices=torch.arange(n),
        )

    base = loss(candidates)
    # candidate 5 has label 0: it is masked for anchors 0 and 3 (label 0) only
    moved = candidates.clone()
    moved[5] = anchors[0] * 10
    changed = loss(moved)
    # anchors 1 and 2 see candidate 5 as a negative, so the loss must change ...
    assert float(changed) != pytest.approx(float(base))

    # ... while with every anchor labelled 0 (all masked) moving it has no effect
    def loss_all_zero(c):
        return masked_classification_loss(
            anchors, c, torch.arange(n) * group, torch.zeros(n, dtype=torch.long), candidate_labels, tau
        )

    assert float(loss_all_zero(moved)) == pytest.approx(float(loss_all_zero(candidates)), rel=1e-12)

    def removed(i, kind, j):
        if kind == "query":
            return int(anchor_labels[j]) == int(anchor_labels[i])
        return int(candidate_labels[j]) == int(anchor_labels[i])

    expected = naive_info_nce(anchors, candidates, group, tau, True, removed)
    assert float(base) == pytest.approx(expected, rel=1e-9)
