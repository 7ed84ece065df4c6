"""GradCache: contrastive batches larger than memory, with the same loss and gradients.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (arXiv 2101.06983). A micro-batch is embedded in mini-batches
without a graph; the full-batch loss (every negative, gathered across ranks,
under Matryoshka, any task) and its gradient with respect to the embeddings are
computed once; then each mini-batch is embedded again with a graph and the
cached gradient is backpropagated through it. The parameter gradient equals
that of one pass over the whole batch (tested), at the memory of one mini-batch
and the compute of one extra forward. RNG states are replayed so dropout masks
match between the two forwards.

Mini-batches are a fixed number of texts, or as many texts as fit a token budget
(texts x padded length, or the packed length).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from tpembed.data import MicroBatch
from tpembed.data.batches import text_lengths
from tpembed.data.templates import pack_sequences, packed_sequences
from tpembed.modeling.distributed import all_finite
from tpembed.train.step import mean_cosine, task_loss


def split_rows(
    lengths: torch.Tensor, max_rows: int | None, token_budget: int | None, packed: bool = False
) -> list[range]:
    """Contiguous text ranges of at most `max_rows` texts, or within `token_budget` tokens
    (padded: texts x longest length; packed: the sum of the lengths)."""
    chunks, start, longest, total = [], 0, 0, 0
    for row, length in enumerate(lengths.tolist()):
        rows, longest_with, total_with = row - start + 1, max(longest, length), total + length
        cost = total_with if packed else rows * longest_with
        too_many = max_rows is not None and rows > max_rows
        too_large = token_budget is not None and cost > token_budget
        if row > start and (too_many or too_large):
            chunks.append(range(start, row))
            start, longest, total = row, length, length
        else:
            longest, total = longest_with, total_with
    chunks.append(range(start, len(lengths)))
    return chunks


def take_rows(batch: dict[str, torch.Tensor], rows: range, padding_side: str) -> dict[str, torch.Tensor]:
    """Texts `rows` of a token batch: padded rows trimmed of all-padding columns, or those
    texts packed again on their own (into rows no longer than the batch's)."""
    if "attention_mask" not in batch:
        sequences = packed_sequences(batch)[rows.start : rows.stop]
        offsets = None
        if "placeholder_positions" in batch:
            offsets = (batch["placeholder_positions"] - batch["sequence_starts"])[rows.start : rows.stop].tolist()
        return pack_sequences(sequences, offsets, row_tokens=batch["input_ids"].shape[1])
    mask = batch["attention_mask"][rows.start : rows.stop]
    length = int(mask.sum(dim=1).max())
    width = mask.shape[1]
    columns = slice(width - length, width) if padding_side == "left" else slice(0, length)
    part = {"input_ids": batch["input_ids"][rows.start : rows.stop, columns], "attention_mask": mask[:, columns]}
    for key in ("last_token_positions", "placeholder_positions"):
        if key in batch:
            part[key] = batch[key][rows.start : rows.stop] - columns.start
    return part


@contextmanager
def replayed_rng(state: tuple):
    """Run with the RNG state captured by `rng_state`, leaving the outer state untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])
        yield


def rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def cached_micro_step(
    encoder,
    objective,
    batch: MicroBatch,
    device,
    backward: Callable[[torch.Tensor, bool], None],
    *,
    max_rows: int | None = None,
    token_budget: int | None = None,
    padding_side: str = "left",
    stats: dict | None = None,
) -> tuple[torch.Tensor, dict, bool]:
    """Loss of a micro-batch with GradCache; `backward(piece, is_last_piece)` backpropagates.

    Returns (loss, per-dim losses, whether gradients were produced). A non-finite
    loss on any rank skips the backward passes on every rank. With `stats`, the anchors'
    mean cosine is stored there too (`mean_cosine`, as in micro_step_loss).
    """
    pieces = []  # (side, token batch, rng state)
    embedded = {}
    with torch.no_grad():
        for side, tokens in (("anchors", batch.anchors), ("candidates", batch.candidates)):
            outputs = []
            packed = "attention_mask" not in tokens
            for rows in split_rows(text_lengths(tokens), max_rows, token_budget, packed):
                part = {k: v.to(device) for k, v in take_rows(tokens, rows, padding_side).items()}
                state = rng_state()
                pieces.append((side, part, state))
                outputs.append(encoder(**part))
            embedded[side] = torch.cat(outputs).float()

    if stats is not None:
        stats["mean_cosine"] = mean_cosine(embedded["anchors"])
    anchors = embedded["anchors"].detach().requires_grad_(True)
    candidates = embedded["candidates"].detach().requires_grad_(True)
    loss, per_dim = task_loss(objective, batch, anchors, candidates, device)
    if not all_finite(loss):
        return loss.detach(), per_dim, False
    loss.backward()  # d loss / d embeddings; the gather collectives run here, on every rank
    cached = {"anchors": anchors.grad, "candidates": candidates.grad}

    offsets = {"anchors": 0, "candidates": 0}
    for index, (side, part, state) in enumerate(pieces):
        rows = part["last_token_positions"].shape[0]
        gradient = cached[side][offsets[side] : offsets[side] + rows]
        offsets[side] += rows
        with replayed_rng(state):
            embedding = encoder(**part)
        backward((embedding.float() * gradient).sum(), index == len(pieces) - 1)
    return loss.detach(), per_dim, True
