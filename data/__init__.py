"""tpembed data: record formats, templates, the grouped sampler and batch building.

Imports nothing else of tpembed.
"""

from tpembed.data.batches import BatchBuilder, DatasetSpec, Lengths, MicroBatch, StepMicroBatches, text_ids
from tpembed.data.formats import ClassificationData, DataError, PairData, ReadReport, RetrievalData, Task, read_dataset
from tpembed.data.sampler import GroupedStepSampler, StepBatch, sampling_probabilities
from tpembed.data.templates import (
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
    "MicroBatch",
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
