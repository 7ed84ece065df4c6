"""Losses: pure functions of embeddings, one concept per file."""

from .classification import masked_classification_loss
from .cosent import cosent_loss
from .infonce import info_nce_loss
from .matryoshka import matryoshka_loss

__all__ = ["cosent_loss", "info_nce_loss", "masked_classification_loss", "matryoshka_loss"]
