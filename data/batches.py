"""From a step's record indices to this rank's tokenised micro-batches.

Examples are built at sampling time from seeded generators, so a step's batch is
a pure function of (seed, step) and a resumed run sees exactly the same texts:

- retrieval: query, one positive, `num_hard_negatives` negatives drawn from the
  record's list for that epoch (seed, dataset, epoch, record).
- classification: the text, another text of the same label as positive, and
  negatives from other labels; labels travel with every text for masking.
- sts: the pair, in its original direction for indices < n and reversed above.

Hard-negative fallback when a record has fewer than requested:
  repeat  (default) draw with replacement from the record's negatives; a record
          with none gets passages of other records of the same dataset.
  random  fill the missing slots with passages of other records.
  error   refuse at start-up (the check names the file and line).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tpembed.data.formats import ClassificationData, PairData, RetrievalData, Task
from tpembed.data.sampler import GroupedStepSampler
from tpembed.data.templates import TextFormat, tokenize

_NEGATIVE_STREAM = 2

FALLBACKS = ("repeat", "random", "error")


@dataclass
class DatasetSpec:
    """One loaded dataset with the settings the batch builder needs."""

    data: RetrievalData | PairData | ClassificationData
    instruction: str | None
    batch_size: int  # global records per step
    num_hard_negatives: int = 4
    lr_scale: float = 1.0  # multiplies the scheduled learning rate of this dataset's steps

    @property
    def task(self) -> Task:
        return self.data.task


@dataclass
class MicroBatch:
    """One rank's share of one micro-step: two sides of token batches and what the task's loss needs.

    retrieval and classification: `anchors` (n texts) and `candidates` (n groups of
    [positive, negative_1, ...]); sts: `anchors` the left texts, `candidates` the right ones.
    """

    task: Task
    dataset: str
    step: int
    anchors: dict[str, torch.Tensor]  # token batch: input_ids, attention_mask (or packed), positions
    candidates: dict[str, torch.Tensor]
    scores: torch.Tensor | None = None  # sts: (n,) gold scores
    anchor_labels: torch.Tensor | None = None  # classification: (n,)
    candidate_labels: torch.Tensor | None = None  # classification: (n * group,)
    candidate_text_ids: torch.Tensor | None = None  # retrieval: (n * group,) for the identical-text rule
    num_examples: int = 0
    lr_scale: float = 1.0  # its dataset's: the step's update uses lr_scale x the scheduled rate
    num_tokens: int = 0  # real tokens of both sides, padding excluded
    squared_lengths: int = 0  # sum of squared text lengths, for the attention FLOPs


@dataclass
class Lengths:
    query: int = 256  # anchors: queries, classification texts, both sides of sts pairs
    passage: int = 1536  # retrieval passages


class BatchBuilder:
    """Builds this rank's micro-batches of a step.

    The global batch of B records is split into world_size contiguous rank slices,
    then each slice into `accumulation_steps` micro-batches, so the gathered batch
    of one micro-step lists the ranks' rows in rank order.
    """

    def __init__(
        self,
        datasets: list[DatasetSpec],
        sampler: GroupedStepSampler,
        tokenizer,
        text_format: TextFormat,
        lengths: Lengths,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        accumulation_steps: int = 1,
        negative_fallback: str = "repeat",
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
        pack_row_tokens: int | None = None,
    ):
        if negative_fallback not in FALLBACKS:
            raise ValueError(f"hard_negative_fallback must be one of {FALLBACKS}, got {negative_fallback!r}")
        for spec in datasets:
            per_micro = spec.batch_size / (world_size * accumulation_steps)
            if per_micro != int(per_micro) or per_micro < 1:
                raise ValueError(
                    f"dataset {spec.data.name!r}: global batch size {spec.batch_size} does not split evenly over "
                    f"{world_size} processes x {accumulation_steps} accumulation steps"
                )
        self.datasets = datasets
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.text_format = text_format
        self.lengths = lengths
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.accumulation_steps = accumulation_steps
        self.negative_fallback = negative_fallback
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing
        self.pack_row_tokens = pack_row_tokens
        self._members_by_label = {
            i: self._group_by_label(spec.data) for i, spec in enumerate(datasets) if spec.task is Task.classification
        }

    def micro_batch(self, step: int, micro_step: int) -> MicroBatch:
        """Micro-batch `micro_step` of this rank at optimizer step `step`."""
        step_batch = self.sampler.batch_at(step)
        spec = self.datasets[step_batch.dataset]
        per_rank = spec.batch_size // self.world_size
        per_micro = per_rank // self.accumulation_steps
        start = self.rank * per_rank + micro_step * per_micro
        indices = step_batch.indices[start : start + per_micro]
        build = {Task.retrieval: self._retrieval, Task.classification: self._classification, Task.sts: self._sts}
        batch = build[spec.task](spec, step_batch.dataset, step_batch.epoch, indices)
        lengths = torch.cat([text_lengths(batch.anchors), text_lengths(batch.candidates)])
        batch.step, batch.dataset, batch.num_examples = step, spec.data.name, len(indices)
        batch.lr_scale = spec.lr_scale
        batch.num_tokens = int(lengths.sum())
        batch.squared_lengths = int((lengths**2).sum())
        return batch

    # ---- per task ------------------------------------------------------------------

    def _retrieval(self, spec: DatasetSpec, dataset: int, epoch: int, indices: np.ndarray) -> MicroBatch:
        data: RetrievalData = spec.data
        k = spec.num_hard_negatives
        queries, passages = [], []
        for index in indices:
            index = int(index)
            rng = self._example_rng(dataset, epoch, index)
            instruction = data.instructions[index] or spec.instruction
            queries.append(self.text_format.pieces(data.queries[index], instruction))
            positives = data.positives[index]
            positive = positives[int(rng.integers(len(positives)))] if len(positives) > 1 else positives[0]
            group = [positive] + self._draw_negatives(data, index, k, rng)
            passages.extend(self.text_format.pieces(text, None) for text in group)
        return MicroBatch(
            Task.retrieval,
            spec.data.name,
            0,
            anchors=self._tokenize(queries, self.lengths.query),
            candidates=self._tokenize(passages, self.lengths.passage),
            candidate_text_ids=text_ids(["".join(p) for p in passages]),
        )

    def _draw_negatives(self, data: RetrievalData, index: int, k: int, rng: np.random.Generator) -> list[str]:
        available = data.negatives[index]
        if k == 0:
            return []
        if len(available) >= k:
            return [available[i] for i in rng.choice(len(available), size=k, replace=False)]
        if self.negative_fallback == "error":
            raise ValueError(f"record {index} of {data.name!r} has {len(available)} hard negatives, {k} required")
        if self.negative_fallback == "repeat" and available:
            return [available[i] for i in rng.choice(len(available), size=k, replace=True)]
        chosen = [available[i] for i in rng.permutation(len(available))]
        while len(chosen) < k:
            other = int(rng.integers(len(data)))
            if other != index:
                options = data.positives[other]
                chosen.append(options[int(rng.integers(len(options)))])
        return chosen

    def _classification(self, spec: DatasetSpec, dataset: int, epoch: int, indices: np.ndarray) -> MicroBatch:
        data: ClassificationData = spec.data
        by_label = self._members_by_label[dataset]
        labels = np.asarray(data.labels)
        k = spec.num_hard_negatives
        anchors, candidates, anchor_labels, candidate_labels = [], [], [], []
        for index in indices:
            index = int(index)
            rng = self._example_rng(dataset, epoch, index)
            label = data.labels[index]
            instruction = data.instructions[index] or spec.instruction
            positive = self._other_same_label(by_label[label], index, rng)
            negatives = []
            while len(negatives) < k:
                other = int(rng.integers(len(data)))
                if labels[other] != label:
                    negatives.append(other)
            anchors.append(self.text_format.pieces(data.texts[index], instruction))
            anchor_labels.append(label)
            for member in [positive] + negatives:
                member_instruction = data.instructions[member] or spec.instruction
                candidates.append(self.text_format.pieces(data.texts[member], member_instruction))
                candidate_labels.append(data.labels[member])
        return MicroBatch(
            Task.classification,
            spec.data.name,
            0,
            anchors=self._tokenize(anchors, self.lengths.query),
            candidates=self._tokenize(candidates, self.lengths.query),
            anchor_labels=torch.tensor(anchor_labels, dtype=torch.long),
            candidate_labels=torch.tensor(candidate_labels, dtype=torch.long),
        )

    @staticmethod
    def _other_same_label(same: np.ndarray, index: int, rng: np.random.Generator) -> int:
        """A uniformly drawn member of `same` other than `index`."""
        position = int(rng.integers(len(same) - 1))
        member = int(same[position])
        return int(same[-1]) if member == index else member

    def _sts(self, spec: DatasetSpec, dataset: int, epoch: int, indices: np.ndarray) -> MicroBatch:
        data: PairData = spec.data
        pairs = len(data.texts1)
        left, right, scores = [], [], []
        for index in indices:
            index = int(index)
            pair = index % pairs
            first, second = data.texts1[pair], data.texts2[pair]
            if index >= pairs:  # the reversed direction
                first, second = second, first
            instruction = data.instructions[pair] or spec.instruction
            left.append(self.text_format.pieces(first, instruction))
            right.append(self.text_format.pieces(second, instruction))
            scores.append(data.scores[pair])
        return MicroBatch(
            Task.sts,
            spec.data.name,
            0,
            anchors=self._tokenize(left, self.lengths.query),
            candidates=self._tokenize(right, self.lengths.query),
            scores=torch.tensor(scores, dtype=torch.float32),
        )

    # ---- helpers -----------------------------------------------------------------------

    def _example_rng(self, dataset: int, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _NEGATIVE_STREAM, dataset, epoch, index])

    def _tokenize(self, pieces: list[tuple[str, str, str]], max_length: int) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, pieces, max_length, self.text_format, self.pad_to_multiple_of, self.packing,
                        self.pack_row_tokens)  # fmt: skip

    @staticmethod
    def _group_by_label(data: ClassificationData) -> dict[int, np.ndarray]:
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(data.labels):
            groups.setdefault(label, []).append(i)
        return {label: np.asarray(members) for label, members in groups.items()}


def text_lengths(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """(texts,) real token counts of a padded or packed token batch."""
    if "attention_mask" in tokens:
        return tokens["attention_mask"].sum(dim=1)
    return tokens["sequence_lengths"]


def text_ids(texts: list[str]) -> torch.Tensor:
    """Stable 63-bit ids of texts, for the identical-text false-negative rule."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in texts],
        dtype=torch.long,
    )


class StepMicroBatches(torch.utils.data.Dataset):
    """Map-style view for a DataLoader: item i is micro-batch i % A of step i // A.

    Being a pure function of the index, it prefetches in worker processes and
    resumes at any step without replaying the data.
    """

    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def __len__(self) -> int:  # unbounded in principle; the loop's index range decides
        return 2**62

    def __getitem__(self, index: int) -> MicroBatch:
        step, micro_step = divmod(index, self.builder.accumulation_steps)
        return self.builder.micro_batch(step, micro_step)
