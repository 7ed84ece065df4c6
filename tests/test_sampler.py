"""The grouped sampler and batch building: one dataset per step, n ** alpha, exact restore."""

import json

import numpy as np
import pytest

from tpembed.data import (
    BatchBuilder,
    DatasetSpec,
    GroupedStepSampler,
    Lengths,
    TextFormat,
    read_dataset,
    sampling_probabilities,
)


def test_probabilities_follow_n_to_the_alpha():
    p = sampling_probabilities([100, 400, 900], alpha=0.5)
    np.testing.assert_allclose(p, np.array([10, 20, 30]) / 60)
    p = sampling_probabilities([100, 400], alpha=1.0, weights=[2.0, 1.0])
    np.testing.assert_allclose(p, [200 / 600, 400 / 600])


def test_eta_ret_split_between_retrieval_and_other_tasks():
    sizes = [100, 400, 900, 100]
    retrieval = [True, True, False, False]
    p = sampling_probabilities(sizes, alpha=0.5, retrieval=retrieval, eta_ret=0.72)
    assert p[:2].sum() == pytest.approx(0.72)
    np.testing.assert_allclose(p[:2], 0.72 * np.array([10, 20]) / 30)
    np.testing.assert_allclose(p[2:], 0.28 * np.array([30, 10]) / 40)


def test_observed_frequencies_within_a_statistical_bound():
    sizes = [100, 400, 1600]
    p = sampling_probabilities(sizes, alpha=0.5)
    sampler = GroupedStepSampler(sizes, [10, 10, 10], seed=7, probabilities=p)
    steps = 20000
    counts = np.bincount([sampler.dataset_at(t) for t in range(steps)], minlength=3)
    # each count is binomial(steps, p_i): allow 5 standard deviations
    sd = np.sqrt(steps * p * (1 - p))
    assert (np.abs(counts - steps * p) < 5 * sd).all(), (counts, steps * p)


def test_eta_ret_observed_share():
    sizes = [100, 400, 900, 2500]
    p = sampling_probabilities(sizes, 0.5, retrieval=[True, False, True, False], eta_ret=0.72)
    sampler = GroupedStepSampler(sizes, [10] * 4, seed=3, probabilities=p)
    steps = 20000
    share = np.mean([sampler.dataset_at(t) in (0, 2) for t in range(steps)])
    assert abs(share - 0.72) < 5 * np.sqrt(0.72 * 0.28 / steps)


def longest_run(flags) -> int:
    longest = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    return longest


@pytest.mark.parametrize("eta_ret", [0.5, 0.72, 0.2])
def test_interleaved_schedule_keeps_the_shares_and_spreads_the_task_types(eta_ret):
    """Same shares as the random draws, counted at every prefix; retrieval and other steps alternate."""
    sizes, retrieval = [100, 400, 900, 2500, 50, 700], [True, False, True, False, False, False]
    p = sampling_probabilities(sizes, 0.5, retrieval=retrieval, eta_ret=eta_ret)
    sampler = GroupedStepSampler(sizes, [10] * 6, seed=3, probabilities=p, schedule="interleaved", groups=retrieval)
    steps = 600
    choices = [sampler.dataset_at(t) for t in range(steps)]
    counts = np.zeros(len(sizes))
    for t, choice in enumerate(choices, start=1):
        counts[choice] += 1
        assert np.abs(counts - t * p).max() < 2.5, (t, counts, t * p)  # every dataset on schedule
    is_retrieval = [retrieval[c] for c in choices]
    # a group runs for at most ceil(its share / the other's) + 1 steps in a row
    assert longest_run(is_retrieval) <= np.ceil(eta_ret / (1 - eta_ret)) + 1
    assert longest_run([not r for r in is_retrieval]) <= np.ceil((1 - eta_ret) / eta_ret) + 1
    # the random schedule with the same seed has longer runs of one group over as many steps
    draws = GroupedStepSampler(sizes, [10] * 6, seed=3, probabilities=p)
    random_flags = [retrieval[draws.dataset_at(t)] for t in range(steps)]
    assert longest_run([not r for r in random_flags]) > longest_run([not r for r in is_retrieval])


def test_interleaved_order_depends_on_the_seed_and_resumes():
    p = sampling_probabilities([60, 90, 30], 0.5)
    first = GroupedStepSampler([60, 90, 30], [6, 9, 3], seed=1, probabilities=p, schedule="interleaved")
    other = GroupedStepSampler([60, 90, 30], [6, 9, 3], seed=2, probabilities=p, schedule="interleaved")
    assert [first.dataset_at(t) for t in range(40)] != [other.dataset_at(t) for t in range(40)]
    iterator = iter(first)
    for _ in range(13):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(iterator) for _ in range(20)]
    restored = GroupedStepSampler([60, 90, 30], [6, 9, 3], seed=1, probabilities=p, schedule="interleaved")
    restored.load_state_dict(state)
    got = [b for _, b in zip(range(20), iter(restored))]
    assert [(b.dataset, b.epoch, b.indices.tolist()) for b in got] == [
        (b.dataset, b.epoch, b.indices.tolist()) for b in expected
    ]
    random_schedule = GroupedStepSampler([60, 90, 30], [6, 9, 3], seed=1, probabilities=p)
    with pytest.raises(ValueError, match="schedule"):
        random_schedule.load_state_dict(state)
    with pytest.raises(ValueError, match="schedule must be one of"):
        GroupedStepSampler([60], [6], seed=1, probabilities=np.array([1.0]), schedule="round-robin")


def test_batches_cover_each_epoch_without_repeats():
    sampler = GroupedStepSampler([50], [10], seed=1, probabilities=np.array([1.0]))
    first_epoch = np.concatenate([sampler.batch_at(t).indices for t in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(50))
    second = sampler.batch_at(5)
    assert second.epoch == 1
    assert not np.array_equal(second.indices, sampler.batch_at(0).indices)


def test_restoring_state_reproduces_the_next_batches():
    p = sampling_probabilities([60, 90], 0.5)
    sampler = GroupedStepSampler([60, 90], [6, 9], seed=11, probabilities=p)
    iterator = iter(sampler)
    for _ in range(17):
        next(iterator)
    state = json.loads(json.dumps(sampler.state_dict()))  # as stored in a checkpoint
    expected = [next(iterator) for _ in range(25)]
    restored = GroupedStepSampler([60, 90], [6, 9], seed=11, probabilities=p)
    restored.load_state_dict(state)
    got = [b for _, b in zip(range(25), iter(restored))]
    for a, b in zip(expected, got):
        assert (a.step, a.dataset, a.epoch) == (b.step, b.dataset, b.epoch)
        assert np.array_equal(a.indices, b.indices)


def test_restoring_with_changed_data_fails_clearly():
    p = sampling_probabilities([60, 90], 0.5)
    sampler = GroupedStepSampler([60, 90], [6, 9], seed=11, probabilities=p)
    other = GroupedStepSampler([60, 91], [6, 9], seed=11, probabilities=sampling_probabilities([60, 91], 0.5))
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(sampler.state_dict())


def test_too_small_dataset_is_rejected():
    with pytest.raises(ValueError, match="fewer than its global batch size"):
        GroupedStepSampler([5], [8], seed=0, probabilities=np.array([1.0]))


@pytest.fixture
def two_datasets(tmp_path):
    rows_a = [
        {"query": f"query a{i}", "pos": [f"pos a{i}"], "negs": [f"neg a{i}.{j}" for j in range(3)]} for i in range(40)
    ]
    rows_b = [
        {"query": f"query b{i}", "pos": f"pos b{i}", "neg": [f"neg b{i}.{j}" for j in range(6)]} for i in range(24)
    ]
    specs = []
    for name, rows in (("a", rows_a), ("b", rows_b)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        specs.append(
            DatasetSpec(read_dataset(path, "retrieval", name), "instruct " + name, batch_size=8, num_hard_negatives=4)
        )
    return specs


def make_builder(specs, tokenizer, world_size=1, rank=0, accumulation=1, fallback="repeat"):
    probabilities = sampling_probabilities([len(s.data) for s in specs], 0.5)
    sampler = GroupedStepSampler([len(s.data) for s in specs], [s.batch_size for s in specs], 5, probabilities)
    return BatchBuilder(
        specs,
        sampler,
        tokenizer,
        TextFormat(),
        Lengths(32, 32),
        seed=5,
        world_size=world_size,
        rank=rank,
        accumulation_steps=accumulation,
        negative_fallback=fallback,
    )


def decoded_queries(batch, tokenizer):
    anchors = batch.anchors
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(anchors["input_ids"], anchors["attention_mask"])]


def test_ranks_share_the_dataset_and_split_the_global_batch(two_datasets, qwen_tokenizer):
    single = make_builder(two_datasets, qwen_tokenizer)
    ranks = [make_builder(two_datasets, qwen_tokenizer, world_size=2, rank=r, accumulation=2) for r in range(2)]
    for step in range(12):
        whole = single.micro_batch(step, 0)
        parts = [ranks[r].micro_batch(step, m) for r in range(2) for m in range(2)]
        assert {p.dataset for p in parts} == {whole.dataset}
        assert sum((decoded_queries(p, qwen_tokenizer) for p in parts), []) == decoded_queries(whole, qwen_tokenizer)


def test_hard_negatives_are_drawn_reproducibly_and_change_per_epoch(two_datasets, qwen_tokenizer):
    builder = make_builder(two_datasets, qwen_tokenizer)
    again = make_builder(two_datasets, qwen_tokenizer)
    for step in range(6):
        a, b = builder.micro_batch(step, 0), again.micro_batch(step, 0)
        assert a.candidates["input_ids"].equal(b.candidates["input_ids"])
    # record 0 of dataset b has 6 negatives: its 4 drawn ones differ between epochs
    rng_epoch0 = builder._example_rng(1, 0, 0)
    rng_epoch1 = builder._example_rng(1, 1, 0)
    data = two_datasets[1].data
    draw0 = builder._draw_negatives(data, 0, 4, rng_epoch0)
    draw1 = builder._draw_negatives(data, 0, 4, rng_epoch1)
    assert len(set(draw0)) == 4 and set(draw0) <= set(data.negatives[0])
    assert draw0 != draw1


def test_negative_fallbacks(two_datasets, qwen_tokenizer):
    data = two_datasets[0].data  # 3 negatives per record, 4 requested
    repeat = make_builder(two_datasets, qwen_tokenizer, fallback="repeat")
    drawn = repeat._draw_negatives(data, 0, 4, np.random.default_rng(0))
    assert len(drawn) == 4 and set(drawn) <= set(data.negatives[0])
    random_fill = make_builder(two_datasets, qwen_tokenizer, fallback="random")
    drawn = random_fill._draw_negatives(data, 0, 4, np.random.default_rng(0))
    assert set(data.negatives[0]) <= set(drawn) and len(drawn) == 4
    assert drawn[-1].startswith("pos a") and drawn[-1] != "pos a0"
