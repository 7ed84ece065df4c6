"""tpembed data: record formats, templates, the grouped sampler and batch building.

Imports nothing else of tpembed.
"""

from .batches import BatchBuilder, DatasetSpec, Lengths, StepMicroBatches, text_ids
from .formats import ClassificationData, DataError, PairData, ReadReport, RetrievalData, Task, read_dataset
from .sampler import GroupedStepSampler, StepBatch, sampling_probabilities
from .templates import (
    NULL_TEXT,
    QUERY_INSTRUCTION_FORMAT,
    TEMPLATES,
    Template,
    TextFormat,
    ensure_placeholder,
    tokenize,
)

__all__ = [
    "NULL_TEXT",
    "QUERY_INSTRUCTION_FORMAT",
    "TEMPLATES",
    "BatchBuilder",
    "ClassificationData",
    "DataError",
    "DatasetSpec",
    "GroupedStepSampler",
    "Lengths",
    "PairData",
    "ReadReport",
    "RetrievalData",
    "StepBatch",
    "StepMicroBatches",
    "Task",
    "Template",
    "TextFormat",
    "ensure_placeholder",
    "read_dataset",
    "sampling_probabilities",
    "text_ids",
    "tokenize",
]
