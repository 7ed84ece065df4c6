"""Data grouping: which dataset, and which of its records, every optimizer step uses.

Every step takes its whole global batch (all ranks, all accumulation micro-steps)
from one dataset, so in-batch negatives are same-domain and CoSENT never mixes
score scales (docs/method.md section 3). Dataset i is picked with probability
proportional to weight_i * n_i ** alpha; in stage 2 the retrieval datasets
together receive a share eta_ret of that mass and the rest 1 - eta_ret.

Everything is a pure function of (seed, step): the dataset of step t comes from a
generator seeded with (seed, t) (schedule "random", the method's), or from a smooth
weighted round-robin with the same shares and a seeded start (schedule "interleaved":
first between the retrieval and the other datasets, then between a group's datasets, so
no task type runs for many steps in a row), identical on every rank without communication;
the records of a dataset's k-th batch are slice k of its per-epoch permutation,
seeded with (seed, dataset, epoch). Each epoch drops its last partial batch, so a
batch never holds the same record twice. The global batch does not depend on the
number of processes or accumulation steps: a run resumed with another process
count sees the same records in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHOICE_STREAM = 0
_PERMUTATION_STREAM = 1
SCHEDULES = ("random", "interleaved")


@dataclass(frozen=True)
class StepBatch:
    """The global batch of one optimizer step."""

    step: int
    dataset: int
    epoch: int  # how many times this dataset had been fully used before this batch
    indices: np.ndarray  # (global_batch_size,) record indices into the dataset


def sampling_probabilities(
    sizes: list[int],
    alpha: float = 0.5,
    weights: list[float] | None = None,
    retrieval: list[bool] | None = None,
    eta_ret: float | None = None,
) -> np.ndarray:
    """p_i proportional to weight_i * n_i ** alpha, optionally split eta_ret / 1 - eta_ret
    between retrieval and other datasets."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    mass = sizes_arr**alpha * (np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=np.float64))
    if (mass <= 0).any() and mass.sum() <= 0:
        raise ValueError("every dataset has zero sampling weight")
    if eta_ret is None or retrieval is None:
        return mass / mass.sum()
    is_retrieval = np.asarray(retrieval, dtype=bool)
    if not 0.0 <= eta_ret <= 1.0:
        raise ValueError(f"eta_ret must lie in [0, 1], got {eta_ret}")
    probabilities = np.zeros_like(mass)
    groups = [(is_retrieval, eta_ret), (~is_retrieval, 1.0 - eta_ret)]
    present = [(members, share) for members, share in groups if members.any() and mass[members].sum() > 0]
    total_share = sum(share for _, share in present)
    for members, share in present:
        probabilities[members] = mass[members] / mass[members].sum() * share / total_share
    return probabilities


class GroupedStepSampler:
    """Deterministic per-step dataset choice and record selection, shared by all ranks.

    Args:
        sizes: number of records of each dataset.
        batch_sizes: global batch size (records per optimizer step) of each dataset.
        seed: the run's data seed.
        probabilities: dataset sampling probabilities (see sampling_probabilities).
        schedule: "random" (each step's dataset drawn independently with `probabilities`) or
            "interleaved" (the same shares, spread evenly over the steps).
        groups: for "interleaved", a group key per dataset (e.g. whether it is a retrieval
            set): the schedule alternates between groups first, then within the group.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_sizes: list[int],
        seed: int,
        probabilities: np.ndarray,
        schedule: str = "random",
        groups: list | None = None,
    ):
        if len(sizes) != len(batch_sizes) or len(sizes) != len(probabilities):
            raise ValueError("sizes, batch_sizes and probabilities must have one entry per dataset")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if groups is not None and len(groups) != len(sizes):
            raise ValueError("groups must have one entry per dataset")
        for i, (size, batch) in enumerate(zip(sizes, batch_sizes)):
            if batch > size:
                raise ValueError(f"dataset {i} has {size} records, fewer than its global batch size {batch}")
        self.sizes = list(sizes)
        self.batch_sizes = list(batch_sizes)
        self.seed = int(seed)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.schedule = schedule
        self.step = 0  # the next step to be drawn: the sampler's position
        self._choices: list[int] = []
        self._pick_counts: list[np.ndarray] = []  # picks of each dataset before step t
        # interleaved: the group of each dataset, the groups' shares, and the round-robin credits of
        # groups and datasets, starting from the seed
        keys = np.asarray(groups if groups is not None else [0] * len(sizes))
        self._group_of = np.unique(keys, return_inverse=True)[1]
        self._group_shares = np.bincount(self._group_of, weights=self.probabilities)
        rng = np.random.default_rng([self.seed, _CHOICE_STREAM])
        self._group_credits = rng.random(len(self._group_shares))
        self._dataset_credits = rng.random(len(self.sizes))

    def dataset_at(self, step: int) -> int:
        """The dataset every rank uses at `step`."""
        self._extend(step + 1)
        return self._choices[step]

    def batch_at(self, step: int) -> StepBatch:
        """The global batch of `step` (a pure function of seed and step)."""
        dataset = self.dataset_at(step)
        picks_before = int(self._pick_counts[step][dataset])
        batch = self.batch_sizes[dataset]
        batches_per_epoch = self.sizes[dataset] // batch
        epoch, position = divmod(picks_before, batches_per_epoch)
        order = self.permutation(dataset, epoch)
        return StepBatch(step, dataset, epoch, order[position * batch : (position + 1) * batch])

    def permutation(self, dataset: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, dataset, epoch])
        return rng.permutation(self.sizes[dataset])

    def __iter__(self):
        while True:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def _extend(self, num_steps: int) -> None:
        while len(self._choices) < num_steps:
            step = len(self._choices)
            counts = self._pick_counts[-1].copy() if self._pick_counts else np.zeros(len(self.sizes), dtype=np.int64)
            if step > 0:
                counts[self._choices[-1]] += 1
            if self.schedule == "interleaved":
                self._choices.append(self._next_interleaved())
            else:
                rng = np.random.default_rng([self.seed, _CHOICE_STREAM, step])
                self._choices.append(int(rng.choice(len(self.sizes), p=self.probabilities)))
            self._pick_counts.append(counts)

    def _next_interleaved(self) -> int:
        """Smooth weighted round-robin: every candidate gains its share of credit, the richest is
        picked and pays 1. Over any t steps each dataset is picked t * p_i times, give or take a
        small constant. Run between the groups, then between the picked group's datasets; the
        starting credits are drawn from the seed, so seeds differ in order but not in shares."""
        shares = self._group_shares
        live = shares > 0
        self._group_credits[live] += shares[live]
        group = int(np.flatnonzero(live)[np.argmax(self._group_credits[live])])
        self._group_credits[group] -= 1.0
        members = np.flatnonzero((self._group_of == group) & (self.probabilities > 0))
        self._dataset_credits[members] += self.probabilities[members] / shares[group]
        dataset = int(members[np.argmax(self._dataset_credits[members])])
        self._dataset_credits[dataset] -= 1.0
        return dataset

    # ---- checkpoint state ------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "batch_sizes": list(self.batch_sizes),
            "probabilities": [float(p) for p in self.probabilities],
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; refuse if the data or its sampling changed."""
        state = {"schedule": "random", **state}  # checkpoints from before the schedule option
        for key in ("seed", "sizes", "batch_sizes", "schedule"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint's sampler has {key}={state[key]}, "
                    f"this run has {getattr(self, key)}. Resume with the same datasets, batch sizes, seed and "
                    "data.schedule."
                )
        if not np.allclose(state["probabilities"], self.probabilities, rtol=0, atol=1e-12):
            raise ValueError(
                "cannot resume the data order: dataset sampling probabilities differ from the checkpoint's "
                "(alpha, weights or eta_ret changed)"
            )
        self.step = int(state["step"])
